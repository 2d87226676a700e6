"""A survey asks nannies a bounded number at once, and its callers share it.

Nannies here are ``distributed.core.Server`` instances on 127.0.0.1 that
answer ``envship_status`` (real comms, counted calls), and in the last test a
real cluster whose ``/envship`` page and ``envship.status`` share a survey.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request

import pytest
from distributed.core import ConnectionPool, Server

import envship
from envship.client import status as status_module
from envship.messages import NannyStatus
from envship.scheduler.registry import Registry
from envship.survey import EMPTY_REGISTRY, SharedSurvey, survey, survey_key
from fixtures.cluster import local_cluster

ID = "a" * 32


class Nannies:
    """``count`` servers answering ``envship_status``, each call counted."""

    def __init__(self, count: int, gate=None):
        self.count = count
        self.gate = gate  # awaited by every call, if given
        self.calls: dict[str, int] = {}
        self.servers: list[Server] = []

    async def __aenter__(self) -> Nannies:
        for i in range(self.count):
            server = Server({})
            await server.listen("tcp://127.0.0.1:0")
            address = server.address
            server.handlers["envship_status"] = self.answer(address, i)
            self.servers.append(server)
            self.calls[address] = 0
        return self

    async def __aexit__(self, *_) -> None:
        for server in self.servers:
            await server.close()

    def answer(self, address: str, i: int):
        async def envship_status(cache: bool = False) -> dict:
            self.calls[address] += 1
            if self.gate is not None:
                await self.gate()
            return NannyStatus(
                ok=True, node=f"host{i}:2049:1", since=1.5e9, cache_root="/c"
            ).to_msg()

        return envship_status

    def identity(self) -> dict:
        return {
            "workers": {
                f"tcp://worker-of-{i}:1": {"nanny": nanny, "name": f"w{i}"}
                for i, nanny in enumerate(self.calls)
            }
        }


def test_nannies_are_asked_at_most_concurrency_at_once():
    inside, peak, answered = 0, 0, asyncio.Event()

    async def gate() -> None:
        nonlocal inside, peak
        inside += 1
        peak = max(peak, inside)
        if inside == 8:  # the bound is full: if it leaked, more would come in
            asyncio.get_running_loop().call_later(0.2, answered.set)
        await answered.wait()
        inside -= 1

    async def main() -> dict:
        pool = await ConnectionPool(limit=512)
        async with Nannies(40, gate) as nannies:
            found = await survey(
                pool, nannies.identity(), EMPTY_REGISTRY, timeout=30, concurrency=8
            )
        await pool.close()
        return found

    found = asyncio.run(main())
    assert peak == 8
    assert len(found["workers"]) == 40
    assert not any(w["unreachable"] for w in found["workers"])


def test_callers_share_one_survey_until_the_state_changes():
    async def main() -> list[int]:
        pool = await ConnectionPool(limit=512)
        seen = []
        async with Nannies(3) as nannies:
            shared = SharedSurvey(max_age=3600)
            identity, registry = nannies.identity(), EMPTY_REGISTRY

            def ask(identity, registry):
                return shared.get(
                    survey_key(identity, registry),
                    lambda: survey(pool, identity, registry, timeout=30),
                )

            # Two at once, then one after: one gathering.
            one, two = await asyncio.gather(
                ask(identity, registry), ask(identity, registry)
            )
            three = await ask(identity, registry)
            assert one is two is three
            seen.append(shared.gathered)
            # A worker reported running something else: gathered again.
            running = {"running": {next(iter(nannies.calls)): {"id": ID}}}
            await ask(identity, {**registry, **running})
            seen.append(shared.gathered)
            # A worker restarted (a new address): gathered again.
            workers = dict(identity["workers"])
            workers["tcp://worker-of-0:2"] = workers.pop("tcp://worker-of-0:1")
            await ask({"workers": workers}, {**registry, **running})
            seen.append(shared.gathered)
            seen.append(sum(nannies.calls.values()))
        await pool.close()
        return seen

    assert asyncio.run(main()) == [1, 2, 3, 9]  # 3 nannies asked 3 times


def test_a_page_gets_the_last_survey_at_once_while_the_next_is_gathered():
    async def main() -> list:
        results = iter([{"n": 1}, {"n": 2}, {"n": 3}, {"n": 4}])

        async def gather() -> dict:
            await asyncio.sleep(0.01)
            return next(results)

        shared = SharedSurvey(max_age=0, serve_stale=True)
        first = await shared.get("k", gather)  # nothing to show yet: waits
        second = await shared.get("k", gather)  # the last one; gathers anew
        await shared.settled()
        third = await shared.get("k", gather)  # the new one; gathers anew
        await shared.settled()
        changed = await shared.get("other", gather)  # a new state: waits
        return [first, second, third, changed, shared.gathered]

    assert asyncio.run(main()) == [{"n": 1}, {"n": 1}, {"n": 2}, {"n": 4}, 4]


def test_gathering_takes_at_most_its_share_of_a_core():
    async def main() -> list[int]:
        async def gather() -> dict:
            deadline = time.process_time() + 0.05  # 50 ms of CPU
            while time.process_time() < deadline:
                pass
            return {}

        # 50 ms at most 1% of a core: shared for 5 s at least.
        shared = SharedSurvey(max_age=0, cpu_share=0.01)
        for _ in range(3):
            await shared.get("k", gather)
        lazy = SharedSurvey(max_age=0)
        for _ in range(3):
            await lazy.get("k", gather)
        return [shared.gathered, lazy.gathered]

    assert asyncio.run(main()) == [1, 3]


def test_a_result_is_shared_no_longer_than_max_age_and_survives_a_caller_gone():
    async def main() -> list[int]:
        pool = await ConnectionPool(limit=512)
        async with Nannies(2) as nannies:
            identity = nannies.identity()
            key = survey_key(identity, EMPTY_REGISTRY)
            shared = SharedSurvey(max_age=0)

            def gather():
                return survey(pool, identity, EMPTY_REGISTRY, timeout=30)

            await shared.get(key, gather)
            await shared.get(key, gather)  # max_age 0: gathered again
            # A caller that gives up stops nobody else's gathering.
            first = asyncio.ensure_future(shared.get(key, gather))
            second = asyncio.ensure_future(shared.get(key, gather))
            await asyncio.sleep(0)
            first.cancel()
            found = await second
            with pytest.raises(asyncio.CancelledError):
                await first
            counts = [shared.gathered, sum(nannies.calls.values())]
            counts.append(len(found["workers"]))
        await pool.close()
        return counts

    assert asyncio.run(main()) == [3, 6, 2]


def test_page_loads_and_status_calls_share_a_survey(tmp_path):
    # Defined here to be pickled by value: the scheduler cannot import tests.
    def share_for_an_hour(dask_scheduler) -> None:
        from envship.scheduler import dashboard
        from envship.survey import SharedSurvey

        dashboard._shared[dask_scheduler] = SharedSurvey(max_age=3600)

    def gathered(dask_scheduler) -> int:
        from envship.scheduler import dashboard

        return dashboard.shared_survey(dask_scheduler).gathered

    with local_cluster(tmp_path, {"a": 2}, dashboard=True) as cluster:
        client = cluster.client
        # No registry yet (nobody switched): the client asks the nannies,
        # and its calls share.
        shared = status_module._shared[client] = SharedSurvey(max_age=3600)
        one, two = envship.status(client), envship.status(client)
        assert shared.gathered == 1
        assert one.workers == two.workers and one.workers is not two.workers
        assert sorted(w["name"] for w in one.workers) == ["a-0", "a-1"]

        # With the registry, the scheduler asks them, for its page and for
        # status calls alike.
        client.register_plugin(Registry(), name=Registry.name)  # serves /envship
        client.run_on_scheduler(share_for_an_hour)
        port = client.scheduler_info()["services"]["dashboard"]
        pages = []
        for _ in range(2):
            url = f"http://127.0.0.1:{port}/envship"
            with urllib.request.urlopen(url, timeout=60) as page:
                pages.append(page.read().decode())
        assert all("a-0" in page and "a-1" in page for page in pages)
        three = envship.status(client)
        assert client.run_on_scheduler(gathered) == 1
        assert three.workers == one.workers
        assert shared.gathered == 1  # the client asked no nanny this time
