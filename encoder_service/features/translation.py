"""Carry users' item-taste sums over to a new item catalogue.

A feature state keeps, per catalogue, the decayed weighted sum of the vectors of the items the
user interacted with, not the items themselves (that would grow with the history). A version
trained with new item vectors therefore finds no sums under its catalogue for users whose
history predates it, and would see every existing user as having no item taste.

The sums are linear in the item vectors. If the new vectors are, on the items both catalogues
know, a linear map of the old ones, ``V_new ≈ V_old · W``, then every user's new sums are the old
sums times ``W``: ``Σ w·v_new(i) ≈ (Σ w·v_old(i)) · W``. ``W`` is a ridge least-squares fit on the
shared items. It is exact when the new vectors are a linear function of the old (a rotation, a
rescaling, a re-run of the same factorisation) and the best linear approximation otherwise; its
fit on the shared items (``r2``) says which case a publish is in. Items only the new catalogue
knows get no history, which is right: nobody interacted with them under the old one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from encoder_service.features.batch import StateBatch
from encoder_service.features.catalog import ItemCatalog
from encoder_service.features.state import FeatureState

log = logging.getLogger(__name__)

RIDGE = 1e-6
"""Ridge penalty relative to the mean squared norm of the shared old vectors: only enough to keep
the solve stable when vectors are collinear, so a linear change of vectors is recovered exactly."""

MIN_SHARED_FACTOR = 2
"""A map needs at least this many shared items per dimension of the old vectors."""


@dataclass(frozen=True)
class CatalogTranslation:
    """The map ``W`` [source dim, target dim] from one catalogue's vectors to another's."""

    source_id: str
    target_id: str
    matrix: np.ndarray
    shared_items: int
    r2: float
    """Share of the target vectors' variance on the shared items that the map explains."""

    def apply(self, sums: np.ndarray) -> np.ndarray:
        """Target-catalogue sums [H, target dim] from source sums [H, source dim]."""
        return np.asarray(sums, dtype=np.float64) @ self.matrix


def fit_translation(source: ItemCatalog, target: ItemCatalog) -> CatalogTranslation | None:
    """The ridge map from ``source`` vectors to ``target`` vectors on their shared items.

    None when they share fewer than ``MIN_SHARED_FACTOR * source.dim`` items: too few to fit a
    map that generalises to the whole history.
    """
    shared = [item for item in target.item_ids if item in source.index]
    if len(shared) < MIN_SHARED_FACTOR * source.dim:
        log.warning(
            "catalogues %s and %s share %d items; no translation of item sums",
            source.hash[:19],
            target.hash[:19],
            len(shared),
        )
        return None
    x = source.vectors[[source.index[i] for i in shared]].astype(np.float64)
    y = target.vectors[[target.index[i] for i in shared]].astype(np.float64)
    penalty = RIDGE * float((x * x).sum(axis=1).mean())
    matrix = np.linalg.solve(x.T @ x + penalty * np.eye(x.shape[1]), x.T @ y)
    residual = float(((x @ matrix - y) ** 2).sum())
    total = float(((y - y.mean(axis=0)) ** 2).sum())
    r2 = 1.0 - residual / total if total > 0 else 1.0
    return CatalogTranslation(source.hash, target.hash, matrix, len(shared), r2)


def fit_translations(
    target: ItemCatalog, sources: Iterable[ItemCatalog]
) -> list[CatalogTranslation]:
    """Maps into ``target`` from each distinct other catalogue, in the order given (preference)."""
    seen = {target.hash}
    maps = []
    for source in sources:
        if source.hash in seen:
            continue
        seen.add(source.hash)
        translation = fit_translation(source, target)
        if translation is not None:
            log.info(
                "item sums %s -> %s: %d shared items, r2 %.3f",
                source.hash[:19],
                target.hash[:19],
                translation.shared_items,
                translation.r2,
            )
            maps.append(translation)
    return maps


def translations_between(
    catalogs: Iterable[ItemCatalog],
) -> dict[str, list[CatalogTranslation]]:
    """For every catalogue, the maps into it from each other one, best fit (``r2``) first.

    What a refresher holds for its live versions: the first event a user gets after a version
    with a new catalogue went live carries the user's history over before adding the event.
    """
    distinct = list({c.hash: c for c in catalogs}.values())
    maps: dict[str, list[CatalogTranslation]] = {}
    for target in distinct:
        found = fit_translations(target, (c for c in distinct if c.hash != target.hash))
        if found:
            maps[target.hash] = sorted(found, key=lambda t: -t.r2)
    return maps


def fill_missing_sums(
    state: FeatureState, translations: Mapping[str, list[CatalogTranslation]]
) -> bool:
    """Give ``state`` sums for every target catalogue it lacks, from the first source it has.

    ``translations`` maps a target catalogue id to its maps in order of preference. Returns
    whether the state changed. A state with no events, or with none of the sources, is left
    alone: the target's sums then start with the user's next event, as for a new user.
    """
    changed = False
    for target_id, maps in translations.items():
        if target_id in state.item_sums or state.count == 0:
            continue
        for translation in maps:
            sums = state.item_sums.get(translation.source_id)
            if sums is not None:
                state.item_sums[target_id] = translation.apply(sums)
                changed = True
                break
    return changed


def fill_missing_batch(
    batch: StateBatch, translations: Mapping[str, list[CatalogTranslation]]
) -> int:
    """:func:`fill_missing_sums` for every user of ``batch`` at once; returns users filled."""
    filled = 0
    for target_id, maps in translations.items():
        for translation in maps:
            source = batch.item_present.get(translation.source_id)
            if source is None:
                continue
            target = batch.item_present.get(target_id)
            missing = ~target if target is not None else np.ones(len(batch), dtype=bool)
            rows = np.flatnonzero(missing & source & (batch.count > 0))
            if not len(rows):
                continue
            batch.set_item_sums(
                target_id, rows, translation.apply(batch.item_sums[translation.source_id][rows])
            )
            filled += len(rows)
    return filled
