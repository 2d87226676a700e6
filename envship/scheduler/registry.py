"""The scheduler's record: which environment workers should run, and who holds what.

A small scheduler plugin, registered by the first client that switches (or by
``dask scheduler --preload envship``). It keeps

- the *desired* environment: a cluster default, and rules by worker identity
  for workers switched on their own, so a nanny that joins or comes back later
  (adaptive scaling, a job scheduler starting more workers, a rebooted node)
  starts its first worker in the right environment. A worker's identity
  (:mod:`envship.identity`) is its name or, for a worker started without one
  (whose name is its address, new at each restart), its nanny's address:
  clients and nannies both send it, so a rule still matches the worker
  after its restarts;
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

It never sees a blob's bytes, and it trusts no message: every handler takes
its keyword arguments as a typed request (:mod:`envship.registry_messages`),
checked for types and sizes before anything is stored, and answers with a
typed answer that goes on the wire as the dict it always was.
"""

from __future__ import annotations

import time
from typing import Any

from distributed.diagnostics.plugin import SchedulerPlugin

from envship import policy
from envship.errors import UnpublishedError
from envship.ids import Address, EnvId, ThinId
from envship.manifest import ThinManifest
from envship.messages import serve
from envship.registry_messages import (
    Claim,
    ClaimAnswer,
    ClaimRecord,
    Conflict,
    Desire,
    Hold,
    Holder,
    Holding,
    Publish,
    Release,
    Running,
    Runs,
    Snapshot,
    Where,
    WhereAnswer,
)
from envship.scheduler.dashboard import add_page, page_survey
from envship.survey import Surveyed
from envship.transfer import Offer, Peer

#: Offers kept beyond those that rules point to (the most recent ones).
SPARE_OFFERS = 16
#: Seconds a holder that has no worker in the cluster stays listed (its worker
#: may be restarting).
HOLDER_GRACE = 120.0
#: Seconds a claim lasts even if its client stays connected and never ends it.
CLAIM_TTL = 3600.0
#: Worker names with a desired environment of their own, most recent kept.
MAX_RULES = 10_000
#: Records of nannies that left, kept beyond twice the live ones.
RECORD_SLACK = 100


class Registry(SchedulerPlugin):
    """envship's state on the scheduler, served through ``envship_*`` handlers.

    Each handler method takes a typed request and gives a typed answer (or
    ``"OK"``); :func:`serve` puts them on the wire.

    Examples
    --------
    >>> client.register_plugin(Registry(), name=Registry.name)  # doctest: +SKIP
    >>> client.sync(client.scheduler.envship_where, name="worker-0")  # doctest: +SKIP
    {'offer': None, 'holders': []}
    """

    name = "envship-registry"

    def __init__(self) -> None:
        self.offers: dict[EnvId, Offer] = {}
        self.thin: dict[EnvId, ThinId] = {}  # environment -> its thin pack
        self.default: EnvId | None = None
        self.by_name: dict[str, EnvId | None] = {}  # by worker identity
        self.holders: dict[EnvId, dict[Address, Holding]] = {}
        self.running: dict[Address, Running] = {}
        self.claims: dict[Address, ClaimRecord] = {}  # the switches under way
        self.scheduler: Any = None  # distributed's Scheduler, once started
        self.policy = policy.Policy()

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler
        self.policy = policy.current()  # the scheduler's config, not the client's
        scheduler.handlers.update(
            {
                "envship_publish": serve(self.publish, Publish),
                "envship_desire": serve(self.desire, Desire),
                "envship_where": serve(self.where, Where),
                "envship_hold": serve(self.hold, Hold),
                "envship_runs": serve(self.runs, Runs),
                "envship_registry": serve(self.snapshot),
                "envship_claim": serve(self.claim, Claim),
                "envship_release": serve(self.release, Release),
                "envship_policy": serve(self.get_policy),
                "envship_survey": serve(self.survey),
            }
        )
        add_page(scheduler, self.name)  # /envship in the dashboard

    # -- handlers ----------------------------------------------------------------

    def publish(self, request: Publish) -> str:
        """Keep an environment's offer, so nanny reports and joiners can use it.

        "kept": the registry keeps the offer it has, whose archive nodes hold
        whole, rather than another piece table of the same id.
        """
        offer = request.offer
        id = EnvId(offer.id)  # checked by Offer.from_msg
        known = self.offers.get(id)
        if (
            known is not None
            and known.table.digest != offer.table.digest
            and any(h.complete for h in self.live_holders(id).values())
        ):
            # Nodes hold the archive of the first table: another table of the
            # same id (another client's, or another packing) would strand
            # every node that fetches from them. The first one stays.
            return "kept"
        self.offers.pop(id, None)
        self.offers[id] = offer  # most recent last
        if isinstance(offer.manifest, ThinManifest):
            self.thin[EnvId(offer.manifest.thin_of)] = ThinId(id)
        self._forget_spare_offers()
        return "OK"

    def desire(self, request: Desire) -> str:
        """Record that workers (``names``, or all) should run in ``id`` (None: their own).

        ``names`` are worker identities (:mod:`envship.identity`).
        """
        id = request.id
        if id is not None:
            offer = self.offers.get(id) or self.offers.get(self.thin.get(id, id))
            if offer is None:
                raise UnpublishedError(f"publish the offer of {id!r} first")
            policy.check(offer.name, id, self.policy)
        if request.names is None:
            self.default = id
            self.by_name.clear()
        else:
            for name in request.names:  # most recent last
                self.by_name.pop(name, None)
                self.by_name[name] = id
            for name in list(self.by_name)[: max(len(self.by_name) - MAX_RULES, 0)]:
                del self.by_name[name]
        self._forget_spare_offers()
        return "OK"

    def where(self, request: Where) -> WhereAnswer:
        """The offer of blob ``id``, or of what worker ``name`` should run, and its holders.

        ``name`` is the worker's identity, as its nanny gives it.

        For a worker's environment whose whole archive nobody holds, the
        offer is that of its thin pack (its manifest says ``thin_of`` and
        ``base``).
        """
        if request.id is not None:
            offer = self.offers.get(request.id)
        else:
            wanted = (
                self.by_name.get(request.name, self.default)
                if request.name is not None
                else self.default
            )
            offer = self.offers.get(wanted) if wanted is not None else None
            if offer is None and wanted in self.thin:
                offer = self.offers.get(self.thin[wanted])
        if offer is None:
            return WhereAnswer(None)
        holders = self.live_holders(EnvId(offer.id))
        return WhereAnswer(
            offer,
            tuple(Holder(Peer(n, h.site), h.complete) for n, h in holders.items()),
        )

    def hold(self, request: Hold) -> str:
        """A nanny holds blob ``id`` (``complete`` or downloading; None: no more)."""
        nanny, id = request.nanny, request.id
        if request.complete is None:
            self.holders.get(id, {}).pop(nanny, None)
            return "OK"
        if id not in self.offers and id not in self.holders:
            return "unknown"  # nothing to point anyone to
        self.holders.setdefault(id, {})[nanny] = Holding(
            request.complete, request.site, request.node, time.time()
        )
        self._forget_gone_nannies()
        return "OK"

    def runs(self, request: Runs) -> str:
        """A nanny's worker now runs in ``id`` (None: the nanny's own environment)."""
        previous = self.running.get(request.nanny)
        if previous is None or previous.id != request.id:
            self.running[request.nanny] = Running(request.id, request.name, time.time())
        self._forget_gone_nannies()
        return "OK"

    def claim(self, request: Claim) -> ClaimAnswer:
        """Claim ``nannies`` for a switch to ``name`` by ``owner`` (one call of ``client``).

        All or nothing: if another switch under way holds any of them, nothing
        is claimed and those conflicts are returned. A claim ends with
        :meth:`release`, when its client disconnects, or after ``CLAIM_TTL``.
        """
        now = time.time()
        live = self.scheduler.clients if self.scheduler is not None else {}
        for nanny, c in list(self.claims.items()):
            if c.client not in live or now - c.since > CLAIM_TTL:
                del self.claims[nanny]
        conflicts = {
            n: Conflict.of(self.claims[n])
            for n in request.nannies
            if n in self.claims and self.claims[n].owner != request.owner
        }
        if not conflicts:
            claim = ClaimRecord(request.owner, request.client, request.name, now)
            self.claims.update(dict.fromkeys(request.nannies, claim))
        return ClaimAnswer(conflicts)

    def release(self, request: Release) -> str:
        """End ``owner``'s claims."""
        self.claims = {n: c for n, c in self.claims.items() if c.owner != request.owner}
        return "OK"

    async def survey(self) -> Surveyed:
        """What ``envship.status`` shows: the dashboard page's survey, shared with it."""
        return Surveyed(await page_survey(self.scheduler, self))

    def get_policy(self) -> policy.Policy:
        """Which environments users may run here (``envship.policy``)."""
        return self.policy

    def snapshot(self) -> Snapshot:
        """Everything above, for ``envship.status`` and the dashboard."""
        return Snapshot(
            default=self.default,
            by_name=dict(self.by_name),
            offers=dict(self.offers),
            holders={id: self.live_holders(id, grace=0) for id in self.holders},
            running=dict(self.running),
        )

    # -- helpers -------------------------------------------------------------------

    def live_holders(
        self, id: EnvId, grace: float = HOLDER_GRACE
    ) -> dict[Address, Holding]:
        """Holders of ``id`` whose nanny has a worker, or reported within ``grace`` s.

        Complete holders first: they can serve every piece.
        """
        workers = self.scheduler.workers.values() if self.scheduler is not None else ()
        nannies = {ws.nanny for ws in workers if ws.nanny}
        now = time.time()
        found = [
            (nanny, h)
            for nanny, h in self.holders.get(id, {}).items()
            if nanny in nannies or now - h.time < grace
        ]
        return dict(sorted(found, key=lambda nh: not nh[1].complete))

    def _forget_gone_nannies(self) -> None:
        """Drop what nannies that left reported, once the records outgrow the
        live nannies (twice over, plus ``RECORD_SLACK``): addresses change as
        nannies come and go, and the records must not grow with them."""
        workers = self.scheduler.workers.values() if self.scheduler is not None else ()
        nannies = {ws.nanny for ws in workers if ws.nanny}
        most = max(len(self.running), *map(len, self.holders.values()), 0)
        if most <= 2 * len(nannies) + RECORD_SLACK:
            return
        now = time.time()
        self.running = {
            n: r
            for n, r in self.running.items()
            if n in nannies or now - r.since < HOLDER_GRACE
        }
        for id, holders in self.holders.items():
            self.holders[id] = {
                n: h
                for n, h in holders.items()
                if n in nannies or now - h.time < HOLDER_GRACE
            }

    def _forget_spare_offers(self) -> None:
        wanted: set[EnvId | None] = {self.default, *self.by_name.values()}
        for id in list(wanted):
            thin = self.offers.get(self.thin[id]) if id in self.thin else None
            if thin is not None and isinstance(thin.manifest, ThinManifest):
                # and the base that it refers to
                wanted.add(EnvId(thin.id))
                if thin.manifest.base is not None:
                    wanted.add(EnvId(thin.manifest.base))
        spare = [id for id in self.offers if id not in wanted]
        for id in spare[: max(len(spare) - SPARE_OFFERS, 0)]:
            del self.offers[id]
            self.holders.pop(id, None)
        self.thin = {e: t for e, t in self.thin.items() if t in self.offers}
