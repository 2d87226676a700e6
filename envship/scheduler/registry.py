"""The scheduler's record: which environment workers should run, and who holds what.

A small scheduler plugin, registered by the first client that switches (or by
``dask scheduler --preload envship``). It keeps

- the *desired* environment: a cluster default, and rules by worker name for
  workers switched on their own, so a nanny that joins or comes back later
  (adaptive scaling, a job scheduler starting more workers, a rebooted node)
  starts its first worker in the right environment;
- each environment's *offer* (id, name, manifest, piece table: a few KiB),
  and the thin packs sent for environments whose whole archive nobody
  holds (a thin pack of X refers to files of a *base* environment whose
  archive is held: a joiner gets the base, then the thin pack);
- which nannies hold which blobs, complete or still downloading, as the
  nannies report it, so a node fetches from whoever holds it *now*;
- what each nanny's worker runs in, and since when;
- which nannies a switch is under way for, and whose (*claims*), so that two
  clients switching the same workers at once do not both succeed: the
  second is refused, naming the first.

It never sees a blob's bytes, and it trusts no message: every handler checks
types and sizes before it stores anything.
"""

from __future__ import annotations

import time

from distributed.diagnostics.plugin import SchedulerPlugin

from envship import policy
from envship.archive import check_id
from envship.manifest import ThinManifest
from envship.scheduler.dashboard import add_page
from envship.transfer import Offer, Peer
from envship.transfer.pieces import check_site, check_text

#: Offers kept beyond those that rules point to (the most recent ones).
SPARE_OFFERS = 16
#: Seconds a holder that has no worker in the cluster stays listed (its worker
#: may be restarting).
HOLDER_GRACE = 120.0
#: Seconds a claim lasts even if its client stays connected and never ends it.
CLAIM_TTL = 3600.0


def _id(value) -> str:
    try:
        return check_id(value)
    except ValueError:
        raise ValueError(f"not an environment id: {value!r}") from None


class Registry(SchedulerPlugin):
    """envship's state on the scheduler, served through ``envship_*`` handlers.

    Examples
    --------
    >>> client.register_plugin(Registry(), name=Registry.name)  # doctest: +SKIP
    >>> client.sync(client.scheduler.envship_where, name="worker-0")  # doctest: +SKIP
    {'offer': None, 'holders': []}
    """

    name = "envship-registry"

    def __init__(self) -> None:
        self.offers: dict[str, dict] = {}
        self.thin: dict[str, str] = {}  # environment id -> its thin pack's id
        self.default: str | None = None
        self.by_name: dict[str, str | None] = {}
        self.holders: dict[str, dict[str, dict]] = {}
        self.running: dict[str, dict] = {}
        # nanny -> {"owner", "client", "name", "since"} of the switch under way
        self.claims: dict[str, dict] = {}
        self.scheduler = None
        self.policy = policy.Policy()

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self.policy = policy.current()  # the scheduler's config, not the client's
        scheduler.handlers.update(
            {
                "envship_publish": self.publish,
                "envship_desire": self.desire,
                "envship_where": self.where,
                "envship_hold": self.hold,
                "envship_runs": self.runs,
                "envship_registry": self.snapshot,
                "envship_claim": self.claim,
                "envship_release": self.release,
                "envship_policy": self.get_policy,
            }
        )
        add_page(scheduler, self.name)  # /envship in the dashboard

    # -- handlers ----------------------------------------------------------------

    def publish(self, offer: dict) -> str:
        """Keep an environment's offer, so nanny reports and joiners can use it."""
        parsed = Offer.from_msg(offer)
        self.offers.pop(parsed.id, None)
        self.offers[parsed.id] = parsed.to_msg()  # most recent last
        if isinstance(parsed.manifest, ThinManifest):
            self.thin[parsed.manifest.thin_of] = parsed.id
        self._forget_spare_offers()
        return "OK"

    def desire(self, id: str | None = None, names: list | None = None) -> str:
        """Record that workers (``names``, or all) should run in ``id`` (None: their own)."""
        if id is not None and _id(id) not in self.offers and id not in self.thin:
            raise ValueError(f"publish the offer of {id!r} first")
        if id is not None:
            offer = self.offers.get(id) or self.offers[self.thin[id]]
            policy.check(offer["name"], id, self.policy)
        if names is None:
            self.default = id
            self.by_name.clear()
        else:
            if not isinstance(names, list | tuple) or len(names) > 100_000:
                raise ValueError("names must be a list of worker names")
            for name in names:
                self.by_name[check_text(str(name), "a worker name")] = id
        self._forget_spare_offers()
        return "OK"

    def where(self, id: str | None = None, name: str | None = None) -> dict:
        """The offer of blob ``id``, or of what worker ``name`` should run, and its holders.

        For a worker's environment whose whole archive nobody holds, the
        offer is that of its thin pack (its manifest says ``thin_of`` and
        ``base``).
        """
        if id is not None:
            offer = self.offers.get(_id(id))
        else:
            if name is not None:
                name = check_text(str(name), "a worker name")
            wanted = (
                self.by_name.get(str(name), self.default)
                if name is not None
                else self.default
            )
            offer = self.offers.get(wanted) if wanted is not None else None
            if offer is None and wanted in self.thin:
                offer = self.offers.get(self.thin[wanted])
        holders = self.live_holders(offer["id"]) if offer else []
        return {"offer": offer, "holders": holders}

    def hold(
        self,
        nanny: str,
        id: str,
        complete: bool | None,
        site: str | None = None,
        node: str | None = None,
    ) -> str:
        """A nanny holds blob ``id`` (``complete`` or downloading; None: no more)."""
        record = {
            "complete": complete,
            "site": check_site(site),
            "node": None if node is None else check_text(node, "a node"),
            "time": time.time(),
        }
        nanny, id = check_text(nanny, "a nanny address"), _id(id)
        if complete is None:
            self.holders.get(id, {}).pop(nanny, None)
            return "OK"
        if not isinstance(complete, bool):
            raise ValueError(f"complete must be true, false or none, not {complete!r}")
        if id not in self.offers and id not in self.holders:
            return "unknown"  # nothing to point anyone to
        self.holders.setdefault(id, {})[nanny] = record
        return "OK"

    def runs(self, nanny: str, id: str | None, name: str | None = None) -> str:
        """A nanny's worker now runs in ``id`` (None: the nanny's own environment)."""
        nanny = check_text(nanny, "a nanny address")
        id = None if id is None else _id(id)
        name = None if name is None else check_text(name, "a name")
        previous = self.running.get(nanny)
        if previous is None or previous["id"] != id:
            self.running[nanny] = {"id": id, "name": name, "since": time.time()}
        return "OK"

    def claim(self, owner: str, client: str, nannies: list, name: str) -> dict:
        """Claim ``nannies`` for a switch to ``name`` by ``owner`` (one call of ``client``).

        All or nothing: if another switch under way holds any of them, nothing
        is claimed and those conflicts are returned. A claim ends with
        :meth:`release`, when its client disconnects, or after ``CLAIM_TTL``.
        """
        owner, client = check_text(owner, "an owner"), check_text(client, "a client id")
        name = check_text(name, "a name")
        if not isinstance(nannies, list | tuple) or len(nannies) > 100_000:
            raise ValueError("nannies must be a list of nanny addresses")
        nannies = [check_text(n, "a nanny address") for n in nannies]
        now = time.time()
        live = self.scheduler.clients
        for nanny, c in list(self.claims.items()):
            if c["client"] not in live or now - c["since"] > CLAIM_TTL:
                del self.claims[nanny]
        conflicts = {
            n: self.claims[n]
            for n in nannies
            if self.claims.get(n, {}).get("owner") not in (None, owner)
        }
        if not conflicts:
            claim = {"owner": owner, "client": client, "name": name, "since": now}
            self.claims.update(dict.fromkeys(nannies, claim))
        return {"conflicts": conflicts}

    def release(self, owner: str) -> str:
        """End ``owner``'s claims."""
        owner = check_text(owner, "an owner")
        self.claims = {n: c for n, c in self.claims.items() if c["owner"] != owner}
        return "OK"

    def get_policy(self) -> dict:
        """Which environments users may run here (``envship.policy``)."""
        return self.policy.to_msg()

    def snapshot(self) -> dict:
        """Everything above, for ``envship.status``."""
        return {
            "default": self.default,
            "by_name": dict(self.by_name),
            "offers": {
                id: {
                    "name": o["name"],
                    "size": o["table"]["size"],
                    "thin_of": o["manifest"].get("thin_of"),
                }
                for id, o in self.offers.items()
            },
            "holders": {
                id: self.live_holders(id, as_peers=False, grace=0)
                for id in self.holders
            },
            "running": dict(self.running),
        }

    # -- helpers -------------------------------------------------------------------

    def live_holders(
        self, id: str, as_peers: bool = True, grace: float = HOLDER_GRACE
    ) -> list:
        """Holders of ``id`` whose nanny has a worker, or reported within ``grace`` s."""
        nannies = {ws.nanny for ws in self.scheduler.workers.values() if ws.nanny}
        now = time.time()
        found = {
            nanny: h
            for nanny, h in self.holders.get(id, {}).items()
            if nanny in nannies or now - h["time"] < grace
        }
        # Complete holders first: they can serve every piece.
        ordered = sorted(found.items(), key=lambda kv: not kv[1]["complete"])
        if as_peers:
            return [
                {**Peer(nanny, h["site"]).to_msg(), "complete": h["complete"]}
                for nanny, h in ordered
            ]
        return [{"nanny": nanny, **h} for nanny, h in ordered]

    def _forget_spare_offers(self) -> None:
        wanted = {self.default, *self.by_name.values()}
        for id in list(wanted):
            thin = self.offers.get(self.thin.get(id))
            if thin is not None:  # and the base that it refers to
                wanted |= {thin["id"], thin["manifest"]["base"]}
        spare = [id for id in self.offers if id not in wanted]
        for id in spare[: max(len(spare) - SPARE_OFFERS, 0)]:
            del self.offers[id]
            self.holders.pop(id, None)
        self.thin = {e: t for e, t in self.thin.items() if t in self.offers}
