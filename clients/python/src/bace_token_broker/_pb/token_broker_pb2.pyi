import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class InvalidateOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INVALIDATE_OUTCOME_UNSPECIFIED: _ClassVar[InvalidateOutcome]
    INVALIDATE_OUTCOME_INVALIDATED: _ClassVar[InvalidateOutcome]
    INVALIDATE_OUTCOME_ALREADY_REPLACED: _ClassVar[InvalidateOutcome]
    INVALIDATE_OUTCOME_TOKEN_VALID: _ClassVar[InvalidateOutcome]
    INVALIDATE_OUTCOME_COOLDOWN: _ClassVar[InvalidateOutcome]

class StoreState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STORE_STATE_UNSPECIFIED: _ClassVar[StoreState]
    STORE_STATE_CONNECTING: _ClassVar[StoreState]
    STORE_STATE_UP: _ClassVar[StoreState]
    STORE_STATE_DOWN: _ClassVar[StoreState]

class AccountState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNT_STATE_UNSPECIFIED: _ClassVar[AccountState]
    ACCOUNT_STATE_READY: _ClassVar[AccountState]
    ACCOUNT_STATE_REFRESHING: _ClassVar[AccountState]
    ACCOUNT_STATE_DEGRADED: _ClassVar[AccountState]
    ACCOUNT_STATE_FAILING: _ClassVar[AccountState]
    ACCOUNT_STATE_REJECTED: _ClassVar[AccountState]
INVALIDATE_OUTCOME_UNSPECIFIED: InvalidateOutcome
INVALIDATE_OUTCOME_INVALIDATED: InvalidateOutcome
INVALIDATE_OUTCOME_ALREADY_REPLACED: InvalidateOutcome
INVALIDATE_OUTCOME_TOKEN_VALID: InvalidateOutcome
INVALIDATE_OUTCOME_COOLDOWN: InvalidateOutcome
STORE_STATE_UNSPECIFIED: StoreState
STORE_STATE_CONNECTING: StoreState
STORE_STATE_UP: StoreState
STORE_STATE_DOWN: StoreState
ACCOUNT_STATE_UNSPECIFIED: AccountState
ACCOUNT_STATE_READY: AccountState
ACCOUNT_STATE_REFRESHING: AccountState
ACCOUNT_STATE_DEGRADED: AccountState
ACCOUNT_STATE_FAILING: AccountState
ACCOUNT_STATE_REJECTED: AccountState

class Token(_message.Message):
    __slots__ = ("account", "access_token", "token_type", "expires_at", "authorization")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    AUTHORIZATION_FIELD_NUMBER: _ClassVar[int]
    account: str
    access_token: str
    token_type: str
    expires_at: _timestamp_pb2.Timestamp
    authorization: str
    def __init__(self, account: _Optional[str] = ..., access_token: _Optional[str] = ..., token_type: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., authorization: _Optional[str] = ...) -> None: ...

class GetTokenRequest(_message.Message):
    __slots__ = ("account", "min_validity")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    MIN_VALIDITY_FIELD_NUMBER: _ClassVar[int]
    account: str
    min_validity: _duration_pb2.Duration
    def __init__(self, account: _Optional[str] = ..., min_validity: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class GetTokenResponse(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: Token
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("account", "access_token")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    ACCESS_TOKEN_FIELD_NUMBER: _ClassVar[int]
    account: str
    access_token: str
    def __init__(self, account: _Optional[str] = ..., access_token: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("invalidated", "token", "outcome")
    INVALIDATED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    invalidated: bool
    token: Token
    outcome: InvalidateOutcome
    def __init__(self, invalidated: _Optional[bool] = ..., token: _Optional[_Union[Token, _Mapping]] = ..., outcome: _Optional[_Union[InvalidateOutcome, str]] = ...) -> None: ...

class WatchTokenRequest(_message.Message):
    __slots__ = ("account",)
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    account: str
    def __init__(self, account: _Optional[str] = ...) -> None: ...

class WatchTokenResponse(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: Token
    def __init__(self, token: _Optional[_Union[Token, _Mapping]] = ...) -> None: ...

class ListAccountsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAccountsResponse(_message.Message):
    __slots__ = ("accounts", "store")
    ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    STORE_FIELD_NUMBER: _ClassVar[int]
    accounts: _containers.RepeatedCompositeFieldContainer[AccountStatus]
    store: StoreStatus
    def __init__(self, accounts: _Optional[_Iterable[_Union[AccountStatus, _Mapping]]] = ..., store: _Optional[_Union[StoreStatus, _Mapping]] = ...) -> None: ...

class StoreStatus(_message.Message):
    __slots__ = ("state", "key_prefix")
    STATE_FIELD_NUMBER: _ClassVar[int]
    KEY_PREFIX_FIELD_NUMBER: _ClassVar[int]
    state: StoreState
    key_prefix: str
    def __init__(self, state: _Optional[_Union[StoreState, str]] = ..., key_prefix: _Optional[str] = ...) -> None: ...

class AccountStatus(_message.Message):
    __slots__ = ("account", "state", "expires_at", "next_refresh_at", "survives_outage_for", "consecutive_failures", "last_error", "last_success_at")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_REFRESH_AT_FIELD_NUMBER: _ClassVar[int]
    SURVIVES_OUTAGE_FOR_FIELD_NUMBER: _ClassVar[int]
    CONSECUTIVE_FAILURES_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_SUCCESS_AT_FIELD_NUMBER: _ClassVar[int]
    account: str
    state: AccountState
    expires_at: _timestamp_pb2.Timestamp
    next_refresh_at: _timestamp_pb2.Timestamp
    survives_outage_for: _duration_pb2.Duration
    consecutive_failures: int
    last_error: str
    last_success_at: _timestamp_pb2.Timestamp
    def __init__(self, account: _Optional[str] = ..., state: _Optional[_Union[AccountState, str]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_refresh_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., survives_outage_for: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., consecutive_failures: _Optional[int] = ..., last_error: _Optional[str] = ..., last_success_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
