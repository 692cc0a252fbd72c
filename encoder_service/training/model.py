"""The multi-group denoising autoencoder whose encoder half becomes the served model.

Each feature group of the schema gets its own small encoder branch and decoder, so a wide group
(the 168-cell rhythm heatmap) cannot drown a narrow one (a profile field) in the fused
bottleneck. The bottleneck is the user embedding.

Denoising drops whole groups rather than single features: a new user often has a profile and one
event but no rhythm or long-term taste yet, and the encoder must still place them sensibly from
what is present. A dropped group is set to its training mean, which is zero after standardisation,
so "missing" and "average" look the same to the encoder, exactly as a cold-start user will.

Input standardisation lives in :class:`Standardize` buffers inside :class:`UserEncoder`, so the
exported ONNX graph takes the raw feature vector and nobody serving it has to re-apply statistics.

Two training-only parts decide what the embedding keeps, and neither is exported:

* **Normalised group losses.** Each group's loss is divided by the loss of the best constant
  predictor of that group on the training set (:func:`null_group_losses`), so every group is
  scored by the fraction of its own uncertainty the embedding explains. Without it the loss is
  dominated by whichever group has the largest raw cross-entropy — the 168-cell heatmap, about
  4.9 nats on MovieLens-100K against 1.0 for a standardised dense group — whether or not it
  carries information, and capacity goes to reconstructing noise.
* **Item-set reconstruction.** A linear decoder predicts, from the embedding, which items the
  user interacted with (a multinomial likelihood over the catalogue, the objective of Mult-DAE,
  Liang et al. 2018, "Variational autoencoders for collaborative filtering"). The item-taste
  features are averages of item vectors; asking the embedding to recover the item set itself
  keeps *which* items a user chose, the signal downstream profile tasks depend on most.

Measured on MovieLens-100K (profile labels held out of the input, linear probe, 5-fold CV, see
docs/evaluation.md): gender AUC / age accuracy / occupation accuracy moved from 0.695 / 0.319 /
0.216 with neither, to 0.708 / 0.361 / 0.226 with the normalisation, and 0.743 / 0.382 / 0.238
with both (item-set weight 30, the training default).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from encoder_service.features.schema import FeatureSchema, Group, Segment, SegmentKind

STD_FLOOR = 1e-3
"""Smallest standard deviation used to scale a feature; constant features would divide by ~0."""


MAX_BRANCH_WIDTH = 128
"""Default widest hidden layer of a group's branches; a wider group is compressed inside its own
branch before the fusion layer sees it. The MovieLens evaluation export uses 256, so its 384
item-taste inputs (128-dim item vectors over three horizons) keep more of what a linear head
needs (docs/evaluation.md, "Weighted item sets and wider branches")."""


def branch_width(group_width: int, max_width: int = MAX_BRANCH_WIDTH) -> int:
    """Hidden width of a group's branches: follows the group's width within [16, max_width]."""
    return min(max_width, max(16, group_width))


def standardisation_stats(x: np.ndarray, floor: float = STD_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and floored standard deviation of ``x`` [N, D], as float32 [D] each.

    Computed in float64 so 100k+ rows do not lose precision in the sums.
    """
    mean = x.mean(axis=0, dtype=np.float64)
    std = x.std(axis=0, dtype=np.float64)
    return mean.astype(np.float32), np.maximum(std, floor).astype(np.float32)


class Standardize(nn.Module):
    """``(x - mean) / std`` with the statistics stored as buffers (saved and exported)."""

    mean: Tensor
    std: Tensor

    def __init__(self, mean: Tensor, std: Tensor) -> None:
        super().__init__()
        self.register_buffer("mean", mean.detach().clone().float())
        self.register_buffer("std", std.detach().clone().float())

    def forward(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std


class GroupBranch(nn.Module):
    """A two-layer MLP, used both to encode a group and to decode it from the embedding."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class UserEncoder(nn.Module):
    """Raw feature vector [B, D] -> embedding [B, E]; the part that is exported to ONNX.

    The bottleneck ends in a LayerNorm without affine parameters, so every embedding has zero
    mean and unit variance across its dimensions: downstream heads and version alignment see one
    scale whatever the user's activity. Measured on 20k synthetic users (D=324, 30 epochs) it
    costs nothing at 64 dimensions (validation loss 7.36 with it, 7.38 without), while at 16
    dimensions, where the two lost degrees of freedom matter more, it was about 4% worse.
    """

    def __init__(
        self,
        groups: Sequence[Group],
        input_dim: int,
        embedding_dim: int,
        mean: Tensor,
        std: Tensor,
        max_branch_width: int = MAX_BRANCH_WIDTH,
    ) -> None:
        super().__init__()
        if mean.shape != (input_dim,) or std.shape != (input_dim,):
            raise ValueError(f"mean and std must have shape ({input_dim},)")
        self.input_dim = input_dim
        self.embedding_dim = embedding_dim
        self.slices = [(g.start, g.end) for g in groups]
        self.standardize = Standardize(mean, std)
        hidden = [branch_width(end - start, max_branch_width) for start, end in self.slices]
        self.branches = nn.ModuleList(
            GroupBranch(end - start, h, h)
            for (start, end), h in zip(self.slices, hidden, strict=True)
        )
        self.fusion = nn.Linear(sum(hidden), embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False)

    def embed(self, z: Tensor) -> Tensor:
        """Embedding [B, E] of an already standardised input ``z`` [B, D]."""
        parts = [
            branch(z[:, start:end])
            for branch, (start, end) in zip(self.branches, self.slices, strict=True)
        ]
        return self.norm(self.fusion(torch.cat(parts, dim=1)))

    def forward(self, x: Tensor) -> Tensor:
        return self.embed(self.standardize(x))


def group_dropout_mask(
    batch_size: int, n_groups: int, p: float, generator: torch.Generator | None = None
) -> Tensor:
    """Boolean [B, G], True where a group is dropped; never all groups of one row.

    A row whose draw dropped every group gets one group back, chosen uniformly, so the encoder is
    never asked to embed nothing. This makes the effective drop rate slightly below ``p`` when
    ``p`` is large or there are few groups. The mask lives on the generator's device (a GPU
    under distributed training with nccl), where the batch is.
    """
    device = generator.device if generator is not None else None
    dropped = torch.rand(batch_size, n_groups, generator=generator, device=device) < p
    all_dropped = dropped.all(dim=1)
    if bool(all_dropped.any()):
        rows = all_dropped.nonzero(as_tuple=True)[0]
        keep = torch.randint(n_groups, (rows.numel(),), generator=generator, device=device)
        dropped[rows, keep] = False
    return dropped


class MultiGroupAutoencoder(nn.Module):
    """Per-group encoders fused into one bottleneck (the embedding), and per-group decoders.

    Args:
        groups: the schema's feature groups, contiguous and covering ``[0, input_dim)``.
        input_dim: width D of the raw feature vector.
        embedding_dim: width E of the embedding.
        mean, std: per-feature statistics [D] of the training set (``std`` already floored);
            default to 0 and 1, e.g. before loading a state dict.
        group_dropout: probability that a group of a training sample is dropped.
        loss_scale: divisor [G] of each group's loss, e.g. :func:`null_group_losses`;
            default 1 (raw losses).
        n_items: width of the item-set decoder's output (0: no item-set reconstruction).
        item_weight: weight of the item-set loss, in units of one (normalised) group.
        item_loss_scale: divisor of the item-set loss, e.g. :func:`null_item_loss`.
        max_branch_width: widest hidden layer of the group encoders and decoders.
    """

    feature_group: Tensor
    loss_scale: Tensor

    def __init__(
        self,
        groups: Sequence[Group],
        input_dim: int,
        embedding_dim: int = 64,
        *,
        mean: np.ndarray | Tensor | None = None,
        std: np.ndarray | Tensor | None = None,
        group_dropout: float = 0.25,
        loss_scale: np.ndarray | Tensor | None = None,
        n_items: int = 0,
        item_weight: float = 1.0,
        item_loss_scale: float = 1.0,
        max_branch_width: int = MAX_BRANCH_WIDTH,
    ) -> None:
        super().__init__()
        if not groups:
            raise ValueError("the schema has no feature groups")
        if groups[0].start != 0 or groups[-1].end != input_dim:
            raise ValueError("groups must cover the input vector [0, input_dim)")
        if not 0.0 <= group_dropout < 1.0:
            raise ValueError("group_dropout must be in [0, 1)")
        self.groups = tuple(groups)
        self.group_dropout = group_dropout
        mean_t = torch.zeros(input_dim) if mean is None else torch.as_tensor(mean)
        std_t = torch.ones(input_dim) if std is None else torch.as_tensor(std)
        self.encoder = UserEncoder(
            groups, input_dim, embedding_dim, mean_t, std_t, max_branch_width
        )
        self.decoders = nn.ModuleList(
            GroupBranch(
                embedding_dim, branch_width(g.end - g.start, max_branch_width), g.end - g.start
            )
            for g in groups
        )
        feature_group = torch.empty(input_dim, dtype=torch.long)
        for index, group in enumerate(groups):
            feature_group[group.start : group.end] = index
        self.register_buffer("feature_group", feature_group, persistent=False)
        scale = torch.ones(len(groups)) if loss_scale is None else torch.as_tensor(loss_scale)
        if scale.shape != (len(groups),) or not bool((scale > 0).all()):
            raise ValueError(f"loss_scale must hold {len(groups)} positive values")
        self.register_buffer("loss_scale", scale.detach().clone().float())
        self.item_decoder = nn.Linear(embedding_dim, n_items) if n_items > 0 else None
        self.item_weight = item_weight
        self.item_loss_scale = item_loss_scale

    @classmethod
    def from_schema(
        cls,
        schema: FeatureSchema,
        embedding_dim: int = 64,
        *,
        mean: np.ndarray | Tensor | None = None,
        std: np.ndarray | Tensor | None = None,
        group_dropout: float = 0.25,
        loss_scale: np.ndarray | Tensor | None = None,
        n_items: int = 0,
        item_weight: float = 1.0,
        item_loss_scale: float = 1.0,
        max_branch_width: int = MAX_BRANCH_WIDTH,
    ) -> MultiGroupAutoencoder:
        return cls(
            schema.groups,
            schema.input_dim,
            embedding_dim,
            mean=mean,
            std=std,
            group_dropout=group_dropout,
            loss_scale=loss_scale,
            n_items=n_items,
            item_weight=item_weight,
            item_loss_scale=item_loss_scale,
            max_branch_width=max_branch_width,
        )

    @property
    def input_dim(self) -> int:
        return self.encoder.input_dim

    @property
    def embedding_dim(self) -> int:
        return self.encoder.embedding_dim

    def encode(self, x: Tensor) -> Tensor:
        """Embedding [B, E] of raw inputs [B, D]; never drops groups, whatever the mode."""
        return self.encoder(x)

    def forward(
        self, x: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """Embedding [B, E] and per-group decoder outputs [B, width] of raw inputs [B, D].

        In training mode whole groups are dropped (see :func:`group_dropout_mask`) before
        encoding; the decoders still have to reconstruct every group.
        """
        return self._reconstruct(self.encoder.standardize(x), generator)

    def _reconstruct(
        self, z: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, list[Tensor]]:
        if self.training and self.group_dropout > 0:
            dropped = group_dropout_mask(
                z.shape[0], len(self.groups), self.group_dropout, generator
            )
            z = z.masked_fill(dropped[:, self.feature_group], 0.0)
        embedding = self.encoder.embed(z)
        return embedding, [decoder(embedding) for decoder in self.decoders]

    def loss(
        self,
        x: Tensor,
        items: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Total training loss (scalar, to minimise) and the unscaled component losses.

        A group's loss is the mean of its segments' losses, so groups with many segments do not
        outweigh the others; the total is the sum over groups of each loss divided by its
        ``loss_scale``, plus ``item_weight`` times the scaled item-set loss when the model has
        an item decoder and ``items`` [B, n_items] (non-negative interaction weights) is given.
        The components are the G group losses, then the item-set loss when it was computed.
        """
        z = self.encoder.standardize(x)
        embedding, outputs = self._reconstruct(z, generator)
        per_group = torch.stack(
            [
                torch.stack(
                    [
                        segment_loss(
                            segment,
                            output[:, segment.start - group.start : segment.end - group.start],
                            x[:, segment.start : segment.end],
                            z[:, segment.start : segment.end],
                        )
                        for segment in group.segments
                    ]
                ).mean()
                for group, output in zip(self.groups, outputs, strict=True)
            ]
        )
        total = (per_group / self.loss_scale).sum()
        if self.item_decoder is None or items is None:
            return total, per_group
        item_loss = distribution_loss(self.item_decoder(embedding), items)
        total = total + self.item_weight * item_loss / self.item_loss_scale
        return total, torch.cat([per_group, item_loss.unsqueeze(0)])


def distribution_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of ``softmax(logits)`` against each row's normalised ``target``.

    The mean is over rows with mass: an all-zero row means "no data", not "a uniform
    preference". Shared by distribution segments and the item-set reconstruction.
    """
    mass = target.sum(dim=1)
    has_mass = mass > 0
    normalised = target / mass.clamp_min(1e-12).unsqueeze(1)
    cross_entropy = -(normalised * F.log_softmax(logits, dim=1)).sum(dim=1)
    return (cross_entropy * has_mass).sum() / has_mass.sum().clamp_min(1)


def segment_loss(segment: Segment, output: Tensor, raw: Tensor, standardised: Tensor) -> Tensor:
    """Reconstruction loss of one segment, chosen by its kind.

    Args:
        segment: the segment, whose ``kind`` picks the loss.
        output: decoder output for the segment [B, W] (logits for distributions and categoricals).
        raw: the raw target slice [B, W].
        standardised: the same slice after standardisation [B, W], the target of dense segments.

    Distributions use cross-entropy against the target distribution (the gradient of KL, which
    differs only by the target's constant entropy), averaged over rows that have mass: an
    all-zero row means "no data", not "a uniform preference". Categoricals use cross-entropy with
    the one-hot's argmax. Dense segments use MSE in standardised units, so a feature's scale does
    not set its weight.
    """
    if segment.kind is SegmentKind.DENSE:
        return F.mse_loss(output, standardised)
    if segment.kind is SegmentKind.CATEGORICAL:
        return F.cross_entropy(output, raw.argmax(dim=1))
    return distribution_loss(output, raw)


LOSS_SCALE_FLOOR = 1e-3
"""Smallest loss scale; a group that is constant on the training set would divide by ~0."""


def null_group_losses(x: np.ndarray, groups: Sequence[Group]) -> np.ndarray:
    """Each group's loss under the best constant prediction of the training rows ``x`` [N, D].

    That is the loss of a model that knows only the training marginals: 1 for every dense
    feature that varies (MSE in standardised units; 0 for a constant one), the entropy of the
    class frequencies for categoricals, and the cross-entropy of each row's distribution against
    the mean distribution for distributions. Used as :class:`MultiGroupAutoencoder`'s
    ``loss_scale``; floored at :data:`LOSS_SCALE_FLOOR`.
    """
    x64 = np.asarray(x, dtype=np.float64)
    scales = []
    for group in groups:
        values = []
        for segment in group.segments:
            raw = x64[:, segment.start : segment.end]
            if segment.kind is SegmentKind.DENSE:
                values.append(float((raw.std(axis=0) > STD_FLOOR).mean()))
            elif segment.kind is SegmentKind.CATEGORICAL:
                values.append(_entropy(np.bincount(raw.argmax(axis=1), minlength=raw.shape[1])))
            else:
                values.append(_null_cross_entropy(raw))
        scales.append(max(float(np.mean(values)), LOSS_SCALE_FLOOR))
    return np.asarray(scales, dtype=np.float32)


def null_item_loss(items: sp.csr_matrix) -> float:
    """Item-set loss of predicting one item distribution (the mean user's) for everyone.

    ``items`` [N, n_items] holds the training rows' non-negative interaction weights; rows
    without mass are left out, as the loss leaves them out.
    """
    mass = np.asarray(items.sum(axis=1)).ravel()
    rows = items[mass > 0].astype(np.float64)
    if not rows.shape[0]:
        return LOSS_SCALE_FLOOR
    normalised = sp.diags(1.0 / mass[mass > 0]) @ rows
    mean = np.asarray(normalised.mean(axis=0)).ravel()
    cross_entropy = -(normalised @ np.log(np.maximum(mean, 1e-12))).mean()
    return max(float(cross_entropy), LOSS_SCALE_FLOOR)


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum() if counts.sum() > 0 else np.ones(1)
    return float(-(p * np.log(p)).sum())


def _null_cross_entropy(raw: np.ndarray) -> float:
    mass = raw.sum(axis=1)
    rows = raw[mass > 0] / mass[mass > 0, None]
    if not len(rows):
        return 0.0
    mean = rows.mean(axis=0)
    return float(-(rows * np.log(np.maximum(mean, 1e-12))).sum(axis=1).mean())
