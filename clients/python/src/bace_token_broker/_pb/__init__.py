"""Stubs generated from `proto/bace/tokenbroker/v1/token_broker.proto` by grpcio-tools
(`scripts/generate_stubs.py`; committed, and proven current by a test). Not public API: use
the names `bace_token_broker` exports."""
