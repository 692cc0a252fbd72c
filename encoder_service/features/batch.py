"""Many users' feature states as column arrays, so a refresher batch is a few numpy calls.

``FeatureState`` is the reference: one user, one event at a time. Refreshing hundreds of users
per batch that way spends most of its time in per-user Python (dict lookups, small array
allocations, JSON per state). ``StateBatch`` holds the same aggregates for ``n`` users as
``[n, ...]`` arrays and name-keyed sums as rows of one array, and

* reads and writes the stored bytes of ``FeatureState`` (byte for byte the same), decoding the
  numbers of all users' ``FS2`` states in one ``np.frombuffer`` rather than per user;
* applies events in *rounds*: round ``r`` folds in the ``r``-th event of every user at once,
  with exactly the floating-point operations ``FeatureState.apply`` performs for that user, in
  the same order, so the result is bit-identical to applying the events one by one (the tests
  check it); a batch where each user has one or two events takes one or two rounds;
* is what :class:`~encoder_service.features.vectorize.Vectorizer` turns into encoder input.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

from encoder_service.data.contract import Event
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.schema import (
    HALF_LIVES_DAYS,
    HEATMAP_CELLS,
    RHYTHM_HALF_LIFE_DAYS,
    UNKNOWN,
)
from encoder_service.features.state import (
    LEGACY_STATE_MAGIC,
    SECONDS_PER_DAY,
    STATE_HEADER,
    STATE_MAGIC,
    FeatureState,
    heatmap_cell,
    item_categories,
)

_H = len(HALF_LIVES_DAYS)
_HALF_LIVES = np.asarray(HALF_LIVES_DAYS, dtype=np.float64)
_RHYTHM = np.asarray((RHYTHM_HALF_LIFE_DAYS,), dtype=np.float64)
_JSON = orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY


class NamedSums:
    """Name-keyed decayed sums of many users: row ``r`` of :attr:`values` is user
    ``owners()[r]``'s sum under ``names[r]``.

    Stored names are loaded user after user, so a user's loaded rows are one contiguous range;
    names a user gets later are appended at the end. Either way a user's rows, in row order, are
    in the order its names were first seen, the order of the dict they stand for, so everything
    summing over names adds in that order.
    """

    def __init__(self, n_users: int, width: int) -> None:
        self.width = width
        self.names: list[str] = []
        self.start = [0] * n_users
        self.stop = [0] * n_users
        self.added: dict[int, dict[str, int]] = {}
        """Per user, rows appended after loading: name -> row."""
        self.added_owner: list[int] = []
        self.values = np.zeros((0, width))

    def __len__(self) -> int:
        return len(self.names)

    def load(self, user: int, names: list[str]) -> None:
        """Register a stored user's names; users must be loaded in increasing order."""
        self.start[user] = len(self.names)
        self.names.extend(names)
        self.stop[user] = len(self.names)

    def rows(self, users: Sequence[int], names: Sequence[str]) -> np.ndarray:
        """The row of each ``(user, name)``, new zero rows for names the user lacks."""
        rows = np.empty(len(users), dtype=np.intp)
        start = len(self.names)
        for k, (user, name) in enumerate(zip(users, names, strict=True)):
            added = self.added.get(user)
            row = added.get(name) if added else None
            if row is None:
                try:
                    row = self.names.index(name, self.start[user], self.stop[user])
                except ValueError:
                    row = len(self.names)
                    self.names.append(name)
                    self.added_owner.append(user)
                    self.added.setdefault(user, {})[name] = row
            rows[k] = row
        if len(self.names) > start:
            grown = np.zeros((len(self.names), self.width))
            grown[:start] = self.values
            self.values = grown
        return rows

    def owners(self) -> np.ndarray:
        loaded = np.asarray(self.stop, dtype=np.intp) - np.asarray(self.start, dtype=np.intp)
        owners = np.repeat(np.arange(len(self.start), dtype=np.intp), loaded)
        return np.concatenate([owners, np.asarray(self.added_owner, dtype=np.intp)])

    def grouped(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows ordered user by user (each user's in name order) and the count per user."""
        owners = self.owners()
        if not self.added_owner:
            order = np.arange(len(owners), dtype=np.intp)
        else:
            order = np.argsort(owners, kind="stable")
        return order, np.bincount(owners, minlength=len(self.start))

    def of(self, user: int) -> list[int]:
        """User ``user``'s rows in name order."""
        return [*range(self.start[user], self.stop[user]), *self.added.get(user, {}).values()]


def _exact_positions(
    cats: np.ndarray, types: np.ndarray, contexts: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Where each number sits in the concatenated float64 sections of ``FS2`` states, given each
    user's number of categories, event types and contexts: ``(section starts and ends [n+1],
    scalar positions [n, 4], category positions [rows, H], event type and context positions)``,
    rows user by user in name order."""
    lengths = 4 + cats * _H + types + contexts
    bounds = np.concatenate([[0], np.cumsum(lengths)]).astype(np.intp)
    starts = bounds[:-1]
    scalars = starts[:, None] + np.arange(4)

    def ranks(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        owners = np.repeat(np.arange(len(counts)), counts)
        first = np.cumsum(counts) - counts
        return owners, np.arange(len(owners)) - first[owners]

    owner, rank = ranks(cats)
    cat_pos = (starts[owner] + 4 + rank * _H)[:, None] + np.arange(_H)
    owner, rank = ranks(types)
    type_pos = starts[owner] + 4 + cats[owner] * _H + rank
    owner, rank = ranks(contexts)
    context_pos = starts[owner] + 4 + cats[owner] * _H + types[owner] + rank
    return bounds, scalars, cat_pos, type_pos, context_pos


@dataclass
class StateBatch:
    """The aggregates of ``n`` users, one row each (see ``FeatureState`` for their meaning)."""

    t_first: np.ndarray
    t_last: np.ndarray
    count: np.ndarray
    weight_sum: np.ndarray
    weight_sq_sum: np.ndarray
    mass: np.ndarray
    heatmap: np.ndarray
    categories: NamedSums
    event_types: NamedSums
    contexts: NamedSums
    profiles: list[dict[str, str | float | None]]
    item_sums: dict[str, np.ndarray] = field(default_factory=dict)
    """Catalogue hash -> ``[n, H, dim]``; rows of users without that sum are zero."""
    item_present: dict[str, np.ndarray] = field(default_factory=dict)
    """Catalogue hash -> ``[n]`` bool: the user holds a sum for that catalogue."""

    def __len__(self) -> int:
        return len(self.count)

    @classmethod
    def empty(cls, n: int) -> StateBatch:
        return cls(
            t_first=np.full(n, math.inf),
            t_last=np.full(n, -math.inf),
            count=np.zeros(n, dtype=np.int64),
            weight_sum=np.zeros(n),
            weight_sq_sum=np.zeros(n),
            mass=np.zeros((n, _H)),
            heatmap=np.zeros((n, HEATMAP_CELLS)),
            categories=NamedSums(n, _H),
            event_types=NamedSums(n, 1),
            contexts=NamedSums(n, 1),
            profiles=[{} for _ in range(n)],
        )

    # --- construction ----------------------------------------------------------------------
    @classmethod
    def from_states(cls, states: Sequence[FeatureState]) -> StateBatch:
        """A batch holding copies of ``states`` (full float64 precision)."""
        batch = cls.empty(len(states))
        cats: list = []
        labels: tuple[list, list] = ([], [])
        for u, state in enumerate(states):
            batch.t_first[u] = state.t_first
            batch.t_last[u] = state.t_last
            batch.count[u] = state.count
            batch.weight_sum[u] = state.weight_sum
            batch.weight_sq_sum[u] = state.weight_sq_sum
            batch.mass[u] = state.mass
            batch.heatmap[u] = state.heatmap
            batch.categories.load(u, list(state.categories))
            cats.extend(state.categories.values())
            for sums, held, flat in (
                (batch.event_types, state.event_types, labels[0]),
                (batch.contexts, state.contexts, labels[1]),
            ):
                sums.load(u, list(held))
                flat.extend(held.values())
            batch.profiles[u] = dict(state.profile)
            for cid, item_sums in state.item_sums.items():
                batch._item_slot(cid, item_sums.shape[1])[u] = item_sums
                batch.item_present[cid][u] = True
        batch.categories.values = np.array(cats, dtype=np.float64).reshape(len(cats), _H)
        batch.event_types.values = np.array(labels[0], dtype=np.float64).reshape(-1, 1)
        batch.contexts.values = np.array(labels[1], dtype=np.float64).reshape(-1, 1)
        return batch

    @classmethod
    def from_bytes(cls, blobs: Sequence[bytes | None]) -> StateBatch:
        """Decode stored states (``FeatureState.to_bytes``); ``None`` is a user without one.

        ``FS2`` states are decoded with one JSON parse of their names each and a few numpy calls
        for the batch; a batch holding an ``FS1`` state goes through ``FeatureState``.

        Raises:
            ValueError: a blob is not a feature state, or is truncated.
        """
        if any(b is not None and b[:3] == LEGACY_STATE_MAGIC for b in blobs):
            return cls.from_states(
                [FeatureState.from_bytes(b) if b is not None else FeatureState() for b in blobs]
            )
        batch = cls.empty(len(blobs))
        present: list[int] = []
        counts: list[int] = []
        shape: list[tuple[int, int, int]] = []
        exact: list[bytes] = []
        layouts: dict[tuple, list[tuple[int, bytes]]] = {}
        for u, data in enumerate(blobs):
            if data is None:
                batch.categories.load(u, [])
                batch.event_types.load(u, [])
                batch.contexts.load(u, [])
                continue
            magic, head_len = STATE_HEADER.unpack_from(data)
            if magic != STATE_MAGIC:
                raise ValueError("not a feature state (bad magic)")
            start = STATE_HEADER.size + head_len
            header = orjson.loads(data[STATE_HEADER.size : start])
            cats, types, contexts = header["cat"], header["et"], header["cx"]
            batch.categories.load(u, cats)
            batch.event_types.load(u, types)
            batch.contexts.load(u, contexts)
            batch.profiles[u] = header["p"]
            end = start + 8 * (4 + len(cats) * _H + len(types) + len(contexts))
            present.append(u)
            counts.append(header["n"])
            shape.append((len(cats), len(types), len(contexts)))
            exact.append(data[start:end])
            layout = tuple((cid, int(dim)) for cid, dim in header["it"])
            layouts.setdefault(layout, []).append((u, data[end:]))
        if present:
            batch._load_exact(present, counts, shape, exact)
        for layout, bodies in layouts.items():
            batch._load_bodies(layout, bodies)
        return batch

    def _load_exact(
        self, users: list[int], counts: list[int], shape: list, sections: list[bytes]
    ) -> None:
        """The float64 sections of the users' ``FS2`` states, decoded in one call."""
        sizes = np.asarray(shape, dtype=np.intp).reshape(len(users), 3)
        bounds, scalars, cat_pos, type_pos, context_pos = _exact_positions(*sizes.T)
        if [len(s) for s in sections] != (8 * np.diff(bounds)).tolist():
            raise ValueError("feature state is truncated or has trailing bytes")
        flat = np.frombuffer(b"".join(sections), dtype="<f8").astype(np.float64)
        index = np.asarray(users, dtype=np.intp)
        self.count[index] = counts
        (
            self.t_first[index],
            self.t_last[index],
            self.weight_sum[index],
            self.weight_sq_sum[index],
        ) = flat[scalars].T
        self.categories.values = flat[cat_pos]
        self.event_types.values = flat[type_pos][:, None]
        self.contexts.values = flat[context_pos][:, None]

    def _load_bodies(self, layout: tuple[tuple[str, int], ...], bodies: list) -> None:
        """The float32 bodies of users sharing one item-sum layout, decoded in one call."""
        width = _H + HEATMAP_CELLS + sum(_H * dim for _, dim in layout)
        if any(len(body) != 4 * width for _, body in bodies):
            raise ValueError("feature state is truncated or has trailing bytes")
        users = np.asarray([u for u, _ in bodies], dtype=np.intp)
        body = np.frombuffer(b"".join(b for _, b in bodies), dtype="<f4")
        matrix = body.reshape(len(bodies), width).astype(np.float64)
        self.mass[users] = matrix[:, :_H]
        self.heatmap[users] = matrix[:, _H : _H + HEATMAP_CELLS]
        cursor = _H + HEATMAP_CELLS
        for cid, dim in layout:
            self._item_slot(cid, dim)[users] = matrix[:, cursor : cursor + _H * dim].reshape(
                len(users), _H, dim
            )
            self.item_present[cid][users] = True
            cursor += _H * dim

    def set_item_sums(self, cid: str, rows: np.ndarray, sums: np.ndarray) -> None:
        """Give the users at ``rows`` the item sums ``sums`` [len(rows), H, dim] for ``cid``."""
        self._item_slot(cid, sums.shape[-1])[rows] = sums
        self.item_present[cid][rows] = True

    def _item_slot(self, cid: str, dim: int) -> np.ndarray:
        sums = self.item_sums.get(cid)
        if sums is None:
            sums = self.item_sums[cid] = np.zeros((len(self), _H, dim))
            self.item_present[cid] = np.zeros(len(self), dtype=bool)
        elif sums.shape[2] != dim:
            raise ValueError(f"item sums of {cid} have two widths ({sums.shape[2]} and {dim})")
        return sums

    # --- output ----------------------------------------------------------------------------
    def to_bytes(self) -> list[bytes]:
        """Each user's state exactly as ``FeatureState.to_bytes`` writes it."""
        n = len(self)
        grouped = [s.grouped() for s in (self.categories, self.event_types, self.contexts)]
        (cat_rows, n_cat), (type_rows, n_type), (context_rows, n_context) = grouped
        bounds, scalars, cat_pos, type_pos, context_pos = _exact_positions(n_cat, n_type, n_context)
        flat = np.empty(bounds[-1], dtype="<f8")
        flat[scalars] = np.stack(
            [self.t_first, self.t_last, self.weight_sum, self.weight_sq_sum], axis=1
        )
        flat[cat_pos] = self.categories.values[cat_rows]
        flat[type_pos] = self.event_types.values[type_rows, 0]
        flat[context_pos] = self.contexts.values[context_rows, 0]
        exact = flat.tobytes()
        offsets = (8 * bounds).tolist()
        names = [
            [sums.names[r] for r in rows.tolist()]
            for sums, rows in (
                (self.categories, cat_rows),
                (self.event_types, type_rows),
                (self.contexts, context_rows),
            )
        ]
        cuts = [np.concatenate([[0], np.cumsum(c)]).tolist() for c in (n_cat, n_type, n_context)]
        counts = self.count.tolist()
        cids = sorted(self.item_sums)
        present = [self.item_present[cid].tolist() for cid in cids]
        layouts: dict[tuple[str, ...], list[int]] = {}
        heads: list[bytes] = []
        for u in range(n):
            held = tuple(cid for cid, mask in zip(cids, present, strict=True) if mask[u])
            layouts.setdefault(held, []).append(u)
            header = {
                "n": counts[u],
                "cat": names[0][cuts[0][u] : cuts[0][u + 1]],
                "et": names[1][cuts[1][u] : cuts[1][u + 1]],
                "cx": names[2][cuts[2][u] : cuts[2][u + 1]],
                "p": self.profiles[u],
                "it": [[cid, int(self.item_sums[cid].shape[2])] for cid in held],
            }
            heads.append(orjson.dumps(header, option=_JSON))
        bodies: list[bytes] = [b""] * n
        for held, users in layouts.items():
            index = np.asarray(users, dtype=np.intp)
            parts = [self.mass[index], self.heatmap[index]]
            parts += [self.item_sums[cid][index].reshape(len(users), -1) for cid in held]
            matrix = np.concatenate(parts, axis=1).astype("<f4")
            for row, u in enumerate(users):
                bodies[u] = matrix[row].tobytes()
        pack = STATE_HEADER.pack
        return [
            b"".join((pack(STATE_MAGIC, len(head)), head, exact[a:b], body))
            for head, a, b, body in zip(heads, offsets[:-1], offsets[1:], bodies, strict=True)
        ]

    def state(self, u: int) -> FeatureState:
        """User ``u`` as a ``FeatureState`` (a copy)."""
        cids = [cid for cid in sorted(self.item_sums) if self.item_present[cid][u]]
        cats, types, contexts = self.categories, self.event_types, self.contexts
        return FeatureState(
            t_first=float(self.t_first[u]),
            t_last=float(self.t_last[u]),
            count=int(self.count[u]),
            weight_sum=float(self.weight_sum[u]),
            weight_sq_sum=float(self.weight_sq_sum[u]),
            mass=self.mass[u].copy(),
            categories={cats.names[r]: cats.values[r].copy() for r in cats.of(u)},
            heatmap=self.heatmap[u].copy(),
            event_types={types.names[r]: float(types.values[r, 0]) for r in types.of(u)},
            contexts={contexts.names[r]: float(contexts.values[r, 0]) for r in contexts.of(u)},
            item_sums={cid: self.item_sums[cid][u].copy() for cid in cids},
            profile=dict(self.profiles[u]),
        )

    # --- applying events -------------------------------------------------------------------
    def apply(
        self, events: Sequence[tuple[int, Event]], catalogs: Mapping[str, ItemCatalog]
    ) -> None:
        """Fold in ``(user, event)`` pairs; each user's events in the order given.

        The same result, bit for bit, as ``FeatureState.apply`` of each user's events in turn.
        """
        rounds: list[list[tuple[int, Event]]] = []
        seen: dict[int, int] = {}
        for user, event in events:
            r = seen.get(user, 0)
            seen[user] = r + 1
            if r == len(rounds):
                rounds.append([])
            rounds[r].append((user, event))
        for pairs in rounds:
            self._apply_round(pairs, catalogs)

    def _apply_round(
        self, pairs: Sequence[tuple[int, Event]], catalogs: Mapping[str, ItemCatalog]
    ) -> None:
        """One event for each of distinct users: ``FeatureState.apply`` for all at once."""
        users = np.fromiter((u for u, _ in pairs), dtype=np.intp, count=len(pairs))
        events = [e for _, e in pairs]
        for u, e in pairs:
            if e.profile:
                self.profiles[u].update(e.profile)
        ts = np.fromiter((e.timestamp for e in events), dtype=np.float64, count=len(events))
        w = np.fromiter((e.weight for e in events), dtype=np.float64, count=len(events))
        first = self.count[users] == 0
        self.t_first[users[first]] = ts[first]
        self.t_last[users[first]] = ts[first]
        delta = ts - self.t_last[users]
        forward = delta >= 0
        self._age(users[forward & (delta != 0) & ~first], delta[forward & (delta != 0) & ~first])
        self.t_last[users[forward]] = ts[forward]
        scale = np.ones((len(users), _H))
        rhythm_scale = np.ones(len(users))
        late = ~forward
        if late.any():
            scale[late] = _decay(-delta[late], _HALF_LIVES)
            rhythm_scale[late] = _decay(-delta[late], _RHYTHM)[:, 0]
        self.t_first[users] = np.minimum(self.t_first[users], ts)
        self.count[users] += 1
        self.weight_sum[users] += w
        self.weight_sq_sum[users] += w * w
        contribution = w[:, None] * scale
        self.mass[users] += contribution

        names: list[str] = []
        owners: list[int] = []
        sources: list[int] = []
        shares = np.empty(len(events))
        per_event = [item_categories(e, catalogs) for e in events]
        for k, (u, cats) in enumerate(zip(users.tolist(), per_event, strict=True)):
            shares[k] = len(cats) or 1
            names.extend(cats)
            owners.extend([u] * len(cats))
            sources.extend([k] * len(cats))
        if names:
            rows = self.categories.rows(owners, names)
            src = np.asarray(sources, dtype=np.intp)
            share = contribution / shares[:, None]
            self.categories.values[rows] = self.categories.values[rows] + share[src]
        for cid, catalog in catalogs.items():
            vectors = _item_vectors(catalog, events, per_event)
            term = contribution[:, :, None] * vectors[:, None, :]
            item_sums = self._item_slot(cid, catalog.dim)
            present = self.item_present[cid][users]
            item_sums[users] = np.where(present[:, None, None], item_sums[users] + term, term)
            self.item_present[cid][users] = True

        rhythm_w = w * rhythm_scale
        cells = np.fromiter(
            (heatmap_cell(e.timestamp) for e in events), dtype=np.intp, count=len(events)
        )
        self.heatmap[users, cells] += rhythm_w
        user_list = users.tolist()
        for sums, labels in (
            (self.event_types, [e.event_type for e in events]),
            (self.contexts, [e.context or UNKNOWN for e in events]),
        ):
            rows = sums.rows(user_list, labels)
            sums.values[rows, 0] = sums.values[rows, 0] + rhythm_w

    def _age(self, users: np.ndarray, delta: np.ndarray) -> None:
        """``FeatureState._age`` for each of ``users`` by its own ``delta`` seconds."""
        if not len(users):
            return
        factors = _decay(delta, _HALF_LIVES)
        rhythm = _decay(delta, _RHYTHM)[:, 0]
        self.mass[users] *= factors
        self.heatmap[users] *= rhythm[:, None]
        per_user = np.zeros((len(self), _H))
        per_user[users] = factors
        aged = np.zeros(len(self), dtype=bool)
        aged[users] = True
        for sums, by in (
            (self.categories, per_user),
            (self.event_types, None),
            (self.contexts, None),
        ):
            if not len(sums):
                continue
            owners = sums.owners()
            rows = aged[owners]
            if by is not None:
                sums.values[rows] = sums.values[rows] * by[owners[rows]]
            else:
                rhythm_of = np.zeros(len(self))
                rhythm_of[users] = rhythm
                sums.values[rows, 0] *= rhythm_of[owners[rows]]
        for cid, item_sums in self.item_sums.items():
            held = users[self.item_present[cid][users]]
            item_sums[held] = item_sums[held] * per_user[held][:, :, None]


def _decay(delta_seconds: np.ndarray, half_lives: np.ndarray) -> np.ndarray:
    """``decay_factors`` for many deltas: ``[n, len(half_lives)]``, the same operations."""
    days = delta_seconds / SECONDS_PER_DAY
    return np.exp2(-days[:, None] / half_lives)


def _item_vectors(
    catalog: ItemCatalog, events: Sequence[Event], categories: Sequence[tuple[str, ...]]
) -> np.ndarray:
    """Each event's item vector in ``catalog`` (``catalog.lookup``), ``[n, dim]`` float32."""
    rows = [catalog.index.get(e.item_id, -1) for e in events]
    index = np.asarray(rows, dtype=np.intp)
    vectors = np.empty((len(events), catalog.dim), dtype=np.float32)
    known = index >= 0
    vectors[known] = catalog.vectors[index[known]]
    for k in np.flatnonzero(~known).tolist():
        vectors[k] = catalog.lookup(events[k].item_id, categories[k])[1]
    return vectors
