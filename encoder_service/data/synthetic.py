"""Synthetic user behaviour with known structure, at any scale.

Real data sets cannot ship with the project and are too small to benchmark throughput, so tests
and benchmarks generate users whose hidden structure is known: every user belongs to one of a
few archetypes that shape what they like (categories), when they are active (daily and weekly
rhythm), on which device, and their profile. A representation is good when it recovers that
structure, which :func:`generate_with_truth` makes checkable.

Everything is drawn with numpy in whole arrays, so a million users (about forty million events)
take well under a minute.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from encoder_service.data.tables import Dataset

START_2024 = 1_704_067_200.0
"""2024-01-01T00:00:00Z, the default start of the generated window."""

EVENT_TYPES = ("view", "click", "purchase")
EVENT_WEIGHTS = (1.0, 2.0, 5.0)
"""The weight of each event type: stronger signals count more."""
DEVICES = ("mobile", "desktop", "tv")
COUNTRIES = ("US", "GB", "DE", "FR", "IN", "BR", "JP", "ES", "IT", "CA", "MX", "NL")
GENDERS = ("F", "M")
VECTOR_DIM = 16
MISSING_RATE = 0.05

_DAY = 86_400.0
_ACTIVITY_TAIL = 1.7
"""Pareto index of events per user; below 2 the variance is infinite, as on real platforms."""
_POPULARITY_EXPONENT = 1.0
"""Zipf exponent of item popularity within a category."""
_MEAN_SESSION_EVENTS = 5.0
_MEAN_GAP_SECONDS = 75.0
_SESSION_BREAK_SECONDS = 600
"""Shortest pause between two sessions of one user."""
_SESSION_FOCUS = 0.7
"""Probability that an event stays in its session's category (sessions are about one thing)."""
_PRIMARY_DEVICE_SHARE = 0.8
_HOUR_SPREAD = 1.3
_BACKGROUND_SHARE = 0.08
"""Share of events at a uniformly random hour, so no hour is ever empty."""


@dataclass(frozen=True)
class Archetype:
    """A kind of user: when they are active, on which device, and who they are."""

    name: str
    peak_hours: tuple[float, ...]
    """UTC hours around which sessions start."""
    weekday_weights: tuple[float, ...]
    """Relative activity Monday .. Sunday."""
    devices: tuple[float, float, float]
    """Probabilities of mobile, desktop, tv."""
    age_mean: float
    activity: float
    """Multiplier on the number of events."""
    purchase_rate: float
    share: float
    """Share of users of this archetype."""


ARCHETYPES: tuple[Archetype, ...] = (
    Archetype(
        "office_hours",
        (10.0, 13.0, 16.0),
        (1, 1, 1, 1, 1, 0.15, 0.1),
        (0.2, 0.75, 0.05),
        41.0,
        0.9,
        0.05,
        0.30,
    ),
    Archetype(
        "night_owl",
        (22.5, 1.0, 3.0),
        (1, 1, 1, 1, 1.2, 1.3, 1.2),
        (0.75, 0.2, 0.05),
        24.0,
        1.4,
        0.02,
        0.20,
    ),
    Archetype(
        "weekend",
        (11.0, 15.0, 20.0),
        (0.15, 0.15, 0.15, 0.15, 0.4, 1.6, 1.6),
        (0.45, 0.15, 0.4),
        34.0,
        0.8,
        0.06,
        0.20,
    ),
    Archetype(
        "commuter",
        (7.5, 18.0),
        (1, 1, 1, 1, 1, 0.3, 0.25),
        (0.9, 0.07, 0.03),
        29.0,
        1.0,
        0.03,
        0.15,
    ),
    Archetype(
        "evening_tv",
        (19.5, 21.5),
        (1, 1, 1, 1, 1.1, 1.2, 1.1),
        (0.15, 0.1, 0.75),
        55.0,
        0.8,
        0.04,
        0.15,
    ),
)


def generate(
    n_users: int,
    *,
    seed: int = 0,
    n_items: int | None = None,
    n_categories: int = 20,
    mean_events: float = 40.0,
    start: float = START_2024,
    days: float = 180.0,
) -> Dataset:
    """A synthetic data set; the same arguments always give the same data.

    Args:
        n_users: Number of users (each has at least one event).
        seed: Seed of every random draw.
        n_items: Catalogue size; defaults to a tenth of the users (at least 100).
        n_categories: Number of item categories.
        mean_events: Target mean number of events per user (heavy-tailed around it).
        start: Unix time where the window starts.
        days: Length of the window; every event falls inside it.
    """
    return generate_with_truth(
        n_users,
        seed=seed,
        n_items=n_items,
        n_categories=n_categories,
        mean_events=mean_events,
        start=start,
        days=days,
    )[0]


def generate_with_truth(
    n_users: int,
    *,
    seed: int = 0,
    n_items: int | None = None,
    n_categories: int = 20,
    mean_events: float = 40.0,
    start: float = START_2024,
    days: float = 180.0,
) -> tuple[Dataset, np.ndarray]:
    """Like :func:`generate`, plus each user's archetype (an index into :data:`ARCHETYPES`,
    aligned with ``dataset.users``), kept out of the tables so no model can read it."""
    n_items = max(100, n_users // 10) if n_items is None else n_items
    if n_users < 1 or n_categories < 1 or n_items < n_categories:
        raise ValueError("need n_users >= 1, n_categories >= 1 and n_items >= n_categories")
    if mean_events < 1 or days * _DAY < 100 * mean_events:
        raise ValueError("need mean_events >= 1 and a window of at least 100 s per mean event")
    rng = np.random.default_rng(seed)
    k = len(ARCHETYPES)
    archetype = rng.choice(k, size=n_users, p=_normalised([a.share for a in ARCHETYPES]))

    favourites = _archetype_tastes(rng, k, n_categories)
    taste = _user_tastes(rng, favourites[archetype])
    counts = _activity(rng, archetype, mean_events)
    catalogue = _Catalogue.draw(rng, n_items, n_categories)

    event_user = np.repeat(np.arange(n_users, dtype=np.int32), counts)
    schedule = _schedule(rng, archetype, counts, event_user, start, days)
    category = _event_categories(rng, taste, schedule, event_user)
    item = catalogue.sample_items(rng, category)
    kind = _event_types(rng, archetype[event_user])
    device = _devices(rng, archetype, event_user)

    user_ids = _ids("u", n_users)
    events = pd.DataFrame(
        {
            "user_id": _take_strings(user_ids, event_user),
            "item_id": _take_strings(_ids("i", n_items), item),
            "timestamp": schedule.timestamps,
            "event_type": _take_strings(pa.array(EVENT_TYPES, pa.large_string()), kind),
            "weight": np.asarray(EVENT_WEIGHTS)[kind],
            "context": pd.Series(np.asarray(DEVICES, dtype=object)[device], dtype=object),
        }
    )
    users = _profiles(rng, archetype, taste, user_ids)
    items = catalogue.table(rng, _ids("i", n_items), n_categories)
    name = f"synthetic-{n_users}u-seed{seed}"
    return Dataset(events, users, items, name, []), archetype


def _normalised(weights: list[float] | np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    return weights / weights.sum(axis=-1, keepdims=True)


def _ids(prefix: str, n: int) -> pa.Array:
    """Zero-padded ids, so that string order is numeric order and the events come out sorted."""
    width = len(str(n - 1))
    digits = pc.utf8_lpad(pc.cast(pa.array(np.arange(n)), pa.string()), width, "0")
    # The stubs' overloads want all arrays or all scalars; pyarrow takes a str among arrays.
    joined = pc.binary_join_element_wise(prefix, digits, "")  # type: ignore[call-overload]
    return joined.cast(pa.large_string())


def _take_strings(values: pa.Array, indices: np.ndarray) -> pd.Series:
    return pd.Series(values.take(pa.array(indices)), dtype="str")


def _archetype_tastes(rng: np.random.Generator, k: int, n_categories: int) -> np.ndarray:
    """Dirichlet concentrations per archetype: a few favourite categories and a thin rest."""
    alpha = np.full((k, n_categories), 0.15)
    favourites = min(4, n_categories)
    for row in alpha:
        row[rng.choice(n_categories, size=favourites, replace=False)] = 2.0
    return alpha


def _user_tastes(rng: np.random.Generator, alpha: np.ndarray) -> np.ndarray:
    """One Dirichlet draw per user around their archetype (gamma draws, normalised)."""
    draws = rng.standard_gamma(alpha).astype(np.float32)
    draws += np.float32(1e-6)  # a user whose draws all underflow still gets a distribution
    return draws / draws.sum(axis=1, keepdims=True)


def _activity(rng: np.random.Generator, archetype: np.ndarray, mean_events: float) -> np.ndarray:
    """Events per user: 1 plus a Lomax (shifted Pareto) draw, capped at 25 times the mean.

    The scale solves the mean of the capped distribution in closed form, so the mean depends
    only on the arguments, not on the sample.
    """
    multiplier = np.array([a.activity for a in ARCHETYPES])
    multiplier /= (multiplier * _normalised([a.share for a in ARCHETYPES])).sum()
    cap = 25.0 * mean_events
    a = _ACTIVITY_TAIL
    target = max(mean_events - 0.5, 0.01)  # 1 + floor(x) adds half an event on average
    scale = target * (a - 1)
    for _ in range(50):  # E[min(X, c)] = s / (a - 1) * (1 - (1 + c / s) ** (1 - a))
        scale = target * (a - 1) / (1 - (1 + (cap - 1) / scale) ** (1 - a))
    lomax = scale * ((1.0 - rng.random(len(archetype))) ** (-1.0 / a) - 1.0)
    counts = 1 + np.floor(lomax * multiplier[archetype])
    return np.minimum(counts, cap).astype(np.int64)


@dataclass(frozen=True)
class _Schedule:
    """When each event happens; events are already in time order within each user."""

    session_user: np.ndarray
    session: np.ndarray
    """Session of each event."""
    timestamps: np.ndarray


def _schedule(
    rng: np.random.Generator,
    archetype: np.ndarray,
    counts: np.ndarray,
    event_user: np.ndarray,
    start: float,
    days: float,
) -> _Schedule:
    """Split each user's events into sessions, place the sessions in the window following the
    archetype's rhythm, and space the events of a session by short gaps.

    Sessions are put in time order within each user before their events get times, and a session
    that would overlap the previous one is pushed after it (a person has one session at a time),
    so the events come out sorted without sorting tens of millions of rows.
    """
    n_users, n_events = len(counts), int(counts.sum())
    user_begin = np.concatenate(([0], np.cumsum(counts)[:-1]))
    new = rng.random(n_events) < 1.0 / _MEAN_SESSION_EVENTS
    new[user_begin] = True
    sessions_per_user = np.add.reduceat(new.astype(np.int64), user_begin)
    session_user = np.repeat(np.arange(n_users, dtype=np.int64), sessions_per_user)
    lengths = np.diff(np.append(np.flatnonzero(new), n_events))

    window_start = int(np.ceil(start))
    window_end = int(np.ceil(start + days * _DAY))
    begin = _session_starts(rng, archetype[session_user], window_start, window_end)
    order = np.argsort(session_user * (window_end - window_start) + (begin - window_start))
    begin, lengths = begin[order], lengths[order]

    first = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    session = np.repeat(np.arange(len(lengths)), lengths)
    gaps = 1 + np.floor(rng.exponential(_MEAN_GAP_SECONDS, n_events)).astype(np.int64)
    gaps[first] = 0
    elapsed = np.cumsum(gaps)
    elapsed -= elapsed[first][session]
    # s'[k] = max(s[k], s'[k-1] + step[k-1]) solves to D[k] + running max of (s - D), with D the
    # sum of the earlier steps of the same user; adding user * big restarts the max per user.
    step = elapsed[first + lengths - 1] + _SESSION_BREAK_SECONDS
    before = np.cumsum(step) - step
    user_first_session = np.concatenate(([0], np.cumsum(sessions_per_user)[:-1]))
    offset = before - before[user_first_session][session_user]
    lifted = begin - offset
    low = int(lifted.min())
    big = int(lifted.max()) - low + 1
    running = np.maximum.accumulate(lifted - low + session_user * big) - session_user * big + low
    moments = (offset + running)[session] + elapsed
    return _Schedule(session_user, session, _end_by(moments, event_user, user_begin, window_end))


def _end_by(
    moments: np.ndarray, event_user: np.ndarray, user_begin: np.ndarray, window_end: int
) -> np.ndarray:
    """Pull events pushed past the window back inside it, one second apart, keeping each
    user's events strictly increasing (so they stay sorted and never repeat exactly).

    ``t'[i] = min(t[i], t'[i + 1] - 1)`` is a reversed running minimum of ``t - rank``;
    adding ``user * span`` keeps the minimum from crossing into an earlier user.
    """
    rank = np.arange(len(moments)) - user_begin[event_user]
    shifted = moments - rank
    last = np.append(user_begin[1:], len(moments)) - 1
    shifted[last] = np.minimum(shifted[last], window_end - 1 - rank[last])
    span = int(shifted.max() - shifted.min()) + 1
    segment = event_user.astype(np.int64) * span
    settled = np.minimum.accumulate((shifted + segment)[::-1])[::-1] - segment + rank
    return settled.astype(np.float64)


def _session_starts(
    rng: np.random.Generator, session_archetype: np.ndarray, window_start: int, window_end: int
) -> np.ndarray:
    """Start of each session, unix seconds: a day by the archetype's weekly rhythm, an hour near
    one of its peaks (or, for a few sessions, any hour)."""
    n = len(session_archetype)
    first_day = window_start // int(_DAY)
    n_days = -(-window_end // int(_DAY)) - first_day
    weekday = (np.arange(first_day, first_day + n_days) + 3) % 7  # 1970-01-01 was a Thursday
    cumulative = np.cumsum(
        _normalised(np.array([a.weekday_weights for a in ARCHETYPES])[:, weekday]), axis=1
    )
    cumulative[:, -1] = 1.0
    segments = (np.arange(len(ARCHETYPES))[:, None] + cumulative).ravel()
    day = np.searchsorted(segments, session_archetype + rng.random(n), side="right")
    day -= session_archetype * n_days

    n_peaks = np.array([len(a.peak_hours) for a in ARCHETYPES])
    peaks = np.zeros((len(ARCHETYPES), n_peaks.max()))
    for row, archetype in zip(peaks, ARCHETYPES, strict=True):
        row[: len(archetype.peak_hours)] = archetype.peak_hours
    pick = (rng.random(n) * n_peaks[session_archetype]).astype(np.int64)
    hour = peaks[session_archetype, pick] + rng.normal(0.0, _HOUR_SPREAD, n)
    background = rng.random(n) < _BACKGROUND_SHARE
    hour[background] = rng.random(int(background.sum())) * 24.0
    moment = np.floor((first_day + day) * _DAY + np.mod(hour, 24.0) * 3600.0).astype(np.int64)
    return window_start + np.mod(moment - window_start, window_end - window_start)


def _categorical_rows(
    rng: np.random.Generator, probabilities: np.ndarray, rows: np.ndarray, chunk: int = 1 << 20
) -> np.ndarray:
    """One draw per entry of ``rows`` from ``probabilities[row]`` (inverse CDF, in chunks so
    the rows-by-categories comparison stays small)."""
    cumulative = np.cumsum(probabilities, axis=1, dtype=np.float32)
    cumulative[:, -1] = 1.0
    out = np.empty(len(rows), dtype=np.int16)
    for begin in range(0, len(rows), chunk):
        block = rows[begin : begin + chunk]
        u = rng.random(len(block), dtype=np.float32)
        out[begin : begin + chunk] = (cumulative[block] <= u[:, None]).sum(axis=1)
    return np.minimum(out, probabilities.shape[1] - 1)


def _event_categories(
    rng: np.random.Generator, taste: np.ndarray, schedule: _Schedule, event_user: np.ndarray
) -> np.ndarray:
    """Each session has a topic; most of its events stay on it, the rest follow the taste."""
    category = _categorical_rows(rng, taste, schedule.session_user)[schedule.session]
    wander = np.flatnonzero(rng.random(len(event_user)) >= _SESSION_FOCUS)
    category[wander] = _categorical_rows(rng, taste, event_user[wander])
    return category


@dataclass(frozen=True)
class _Catalogue:
    primary: np.ndarray
    extra: np.ndarray
    """Secondary category per item, -1 for none; shape (n_items, 2)."""
    popularity: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, n_items: int, n_categories: int) -> _Catalogue:
        """Items in 1-3 categories with Zipf popularity; category sizes are uneven too."""
        size = _normalised(1.0 / np.arange(1, n_categories + 1) ** 0.6)
        primary = np.concatenate(
            (np.arange(n_categories), rng.choice(n_categories, n_items - n_categories, p=size))
        )
        primary = rng.permutation(primary)
        extra = rng.choice(n_categories, size=(n_items, 2))
        n_extra = rng.choice(3, size=n_items, p=[0.55, 0.3, 0.15])
        extra[np.arange(2)[None, :] >= n_extra[:, None]] = -1
        extra[extra == primary[:, None]] = -1
        extra[(extra[:, 1] == extra[:, 0]), 1] = -1
        rank = rng.permutation(n_items) + 1
        return cls(primary, extra, rank.astype(np.float64) ** -_POPULARITY_EXPONENT)

    def sample_items(self, rng: np.random.Generator, category: np.ndarray) -> np.ndarray:
        """An item of each event's category, by popularity.

        Events are grouped by category (a radix sort of small integers) so that each inverse-CDF
        lookup runs against one category's short table, which stays in cache.
        """
        n_items = len(self.primary)
        members = np.concatenate((self.primary[:, None], self.extra), axis=1)
        member_item = np.repeat(np.arange(n_items), 3)[members.ravel() >= 0]
        member_cat = members.ravel()[members.ravel() >= 0]
        by_category = np.argsort(category, kind="stable")
        per_category = np.bincount(category, minlength=int(member_cat.max()) + 1)
        item = np.empty(len(category), dtype=np.int32)
        begin = 0
        for c, n in enumerate(per_category.tolist()):
            candidates = member_item[member_cat == c]
            cumulative = np.cumsum(self.popularity[candidates])
            u = rng.random(n) * cumulative[-1]
            picked = np.minimum(np.searchsorted(cumulative, u, side="right"), len(candidates) - 1)
            item[by_category[begin : begin + n]] = candidates[picked]
            begin += n
        return item

    def table(
        self, rng: np.random.Generator, item_ids: pa.Array, n_categories: int
    ) -> pd.DataFrame:
        """Items with category names and a content vector near their categories' centroid."""
        names = [f"category_{c:02d}" for c in range(n_categories)]
        centroids = rng.normal(size=(n_categories, VECTOR_DIM))
        members = np.concatenate((self.primary[:, None], self.extra), axis=1)
        present = members >= 0
        vectors = (centroids[np.where(present, members, 0)] * present[..., None]).sum(axis=1)
        vectors /= present.sum(axis=1, keepdims=True)
        vectors += 0.35 * rng.normal(size=vectors.shape)
        categories = [tuple(names[c] for c in row if c >= 0) for row in members.tolist()]
        return pd.DataFrame(
            {
                "item_id": pd.Series(item_ids, dtype="str"),
                "categories": pd.Series(categories, dtype=object),
                "vector": pd.Series(list(vectors.astype(np.float32)), dtype=object),
            }
        )


def _event_types(rng: np.random.Generator, event_archetype: np.ndarray) -> np.ndarray:
    purchase = np.array([a.purchase_rate for a in ARCHETYPES])[event_archetype]
    u = rng.random(len(event_archetype))
    return np.where(u < purchase, 2, np.where(u < purchase + 0.2, 1, 0)).astype(np.int8)


def _devices(rng: np.random.Generator, archetype: np.ndarray, event_user: np.ndarray) -> np.ndarray:
    """Each user mostly stays on a preferred device, which their archetype makes likely."""
    device_probabilities = np.array([a.devices for a in ARCHETYPES])
    primary = _categorical_rows(rng, device_probabilities, archetype)
    device = primary[event_user]
    other = np.flatnonzero(rng.random(len(event_user)) >= _PRIMARY_DEVICE_SHARE)
    device[other] = _categorical_rows(rng, device_probabilities, archetype[event_user[other]])
    return device


def _profiles(
    rng: np.random.Generator, archetype: np.ndarray, taste: np.ndarray, user_ids: pa.Array
) -> pd.DataFrame:
    """Age follows the archetype, gender follows taste, country is independent; 5% missing."""
    n = len(archetype)
    age_mean = np.array([a.age_mean for a in ARCHETYPES])[archetype]
    age = np.clip(np.round(rng.normal(age_mean, 7.0)), 16, 85)
    direction = rng.normal(size=int(taste.shape[1])).astype(np.float32)
    lean = taste @ direction
    lean = (lean - lean.mean()) / max(float(lean.std()), 1e-9)
    female = rng.random(n) < 1.0 / (1.0 + np.exp(-2.0 * lean))
    gender = np.where(female, GENDERS[0], GENDERS[1]).astype(object)
    country = np.asarray(COUNTRIES, dtype=object)[
        rng.choice(len(COUNTRIES), size=n, p=_normalised(1.0 / np.arange(1, len(COUNTRIES) + 1)))
    ]
    age[rng.random(n) < MISSING_RATE] = np.nan
    gender[rng.random(n) < MISSING_RATE] = None
    country[rng.random(n) < MISSING_RATE] = None
    return pd.DataFrame(
        {
            "user_id": pd.Series(user_ids, dtype="str"),
            "age": age,
            "gender": pd.Series(gender, dtype=object),
            "country": pd.Series(country, dtype=object),
        }
    )
