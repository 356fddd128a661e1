"""Lists BACE physical devices with a token from the broker: the client library end to end.

    python physical_devices.py --broker token-broker:50051 --account fleet-a
    python physical_devices.py --broker ... --account ... --library httpx-async
    python physical_devices.py --broker https://token-broker:50051 --ca-file ca.crt \\
        --token-file /var/run/secrets/broker/token --account fleet-a

Prints the HTTP status and the number of devices; exits 1 on an HTTP error, 2 when the broker
fails (the typed error's message, which never holds a token)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from bace_token_broker import AsyncBrokerClient, BrokerClient, BrokerError

DEFAULT_URL = "https://api.bace-iot.com/api/v2/physical-device"


def with_requests(client: BrokerClient, account: str, url: str) -> tuple[int, object]:
    import requests

    from bace_token_broker import RequestsAuth

    with requests.Session() as session:
        session.auth = RequestsAuth(client, account)
        response = session.get(url, timeout=30)
        return response.status_code, response.json() if response.ok else None


def with_httpx(client: BrokerClient, account: str, url: str) -> tuple[int, object]:
    import httpx

    from bace_token_broker import HttpxAuth

    with httpx.Client(auth=HttpxAuth(client, account), timeout=30) as http:
        response = http.get(url)
        return response.status_code, response.json() if response.is_success else None


async def with_httpx_async(client: AsyncBrokerClient, account: str, url: str) -> tuple[int, object]:
    import httpx

    from bace_token_broker import HttpxAuth

    async with client, httpx.AsyncClient(auth=HttpxAuth(client, account), timeout=30) as http:
        response = await http.get(url)
        return response.status_code, response.json() if response.is_success else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", required=True, help="host:port, http:// or https://")
    parser.add_argument("--account", required=True)
    parser.add_argument("--url", default=DEFAULT_URL)
    parser.add_argument(
        "--library", choices=["requests", "httpx", "httpx-async"], default="requests"
    )
    parser.add_argument("--ca-file")
    parser.add_argument("--cert-file")
    parser.add_argument("--key-file")
    parser.add_argument("--token-file")
    args = parser.parse_args()
    options = dict(
        timeout=5.0,
        ca_file=args.ca_file,
        cert_file=args.cert_file,
        key_file=args.key_file,
        token_file=args.token_file,
    )
    try:
        if args.library == "httpx-async":
            client = AsyncBrokerClient(args.broker, **options)
            status, devices = asyncio.run(with_httpx_async(client, args.account, args.url))
        else:
            with BrokerClient(args.broker, **options) as sync_client:
                call = with_requests if args.library == "requests" else with_httpx
                status, devices = call(sync_client, args.account, args.url)
    except BrokerError as e:
        print(f"broker: {e}", file=sys.stderr)
        return 2
    if devices is None:
        print(f"HTTP {status}")
        return 1
    print(f"HTTP {status}: {len(devices) if isinstance(devices, list) else 1} device(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
