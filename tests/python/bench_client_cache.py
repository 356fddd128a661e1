"""What a cached token costs in the Python client (not a test: run it by hand).

    .venv/bin/python tests/python/bench_client_cache.py

Starts the fake BACE and the broker (target/debug binaries), fetches one token, then times
`BrokerClient.token`, `RequestsAuth.__call__` (on one prepared request, without preparing it)
and `AsyncBrokerClient.token` answered from the cache: the best of 5 rounds, per call."""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests  # noqa: E402
import testkit  # noqa: E402
from client_harness import ACCOUNTS, BrokerProcess, broker_config, credentials  # noqa: E402

from bace_token_broker import AsyncBrokerClient, BrokerClient, RequestsAuth  # noqa: E402

ACCOUNT = ACCOUNTS[0]


def best(call, number: int) -> float:
    return min(timeit.repeat(call, number=number, repeat=5)) / number


async def async_best(client: AsyncBrokerClient, number: int) -> float:
    await client.token(ACCOUNT)
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(number):
            await client.token(ACCOUNT)
        rounds.append((time.perf_counter() - start) / number)
    await client.close()
    return min(rounds)


def main() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="bench-client-"))
    accounts = [dict(credentials(n), login_lifetime_secs=3600) for n in ACCOUNTS]
    with testkit.FakeBaceProcess(testkit.fake_bace_bin(), accounts, workdir) as fake:
        broker = BrokerProcess(testkit.broker_bin(), broker_config(fake), workdir)
        try:
            with BrokerClient(broker.addr) as client:
                client.token(ACCOUNT)
                print(
                    f"BrokerClient.token (cached):      {best(lambda: client.token(ACCOUNT), 200_000) * 1e9:6.0f} ns"
                )
                auth = RequestsAuth(client, ACCOUNT)

                request = requests.Request("GET", fake.api_url).prepare()
                hooks = request.hooks["response"]

                def call_auth() -> None:
                    auth(request)  # sets the header, registers its response hook
                    hooks.clear()

                print(f"RequestsAuth.__call__ (cached):   {best(call_auth, 200_000) * 1e9:6.0f} ns")
            seconds = asyncio.run(async_best(AsyncBrokerClient(broker.addr), 100_000))
            print(f"AsyncBrokerClient.token (cached): {seconds * 1e9:6.0f} ns")
        finally:
            broker.stop_cleanly()


if __name__ == "__main__":
    main()
