"""The one list of what clipopt trains: each stage's asset, report variant, kind and starting encoder.

Every other layer reads this registry: the Dagster asset factory, the store layout (``models/<asset>``),
the report rows, the CLI's ``--stage`` choices and the launchpad configs. Adding a variant means
adding one :class:`Stage` here (see docs/method.md for what each kind trains).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["retrieval", "mcip", "realign"]
KINDS: tuple[Kind, ...] = ("retrieval", "mcip", "realign")
BASELINE = "baseline"


@dataclass(frozen=True)
class Stage:
    """One trained model.

    Attributes:
        asset: Dagster asset name, also its store folder ``models/<asset>``.
        variant: its row in the evaluation report.
        kind: ``retrieval`` (stage 1, ArcMargin), ``mcip`` (ArcMargin + multi-caption ArcMargin) or
            ``realign`` (stage 2: text tower realigned to a frozen image tower).
        encoder: for ``realign``, the asset whose checkpoint it starts from; ``None`` otherwise
            (retrieval and MCIP start from the base model).
        summary: one line for the UI and ``--help``.
    """

    asset: str
    variant: str
    kind: Kind
    encoder: str | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"stage {self.asset!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if (self.kind == "realign") != (self.encoder is not None):
            raise ValueError(f"stage {self.asset!r}: a realign stage needs an encoder, other kinds must not have one")


STAGES: tuple[Stage, ...] = (
    Stage("retrieval_encoder", "stage1", "retrieval",
          summary="Stage 1: the image tower fine-tuned with ArcMargin on the training classes (text tower untouched)."),
    Stage("realigned_2sft", "2sft", "realign", encoder="retrieval_encoder",
          summary="2SFT stage 2: the text tower's last blocks realigned (InfoNCE) to the frozen stage-1 image space."),
    Stage("mcip_encoder", "mcip", "mcip",
          summary="MCIP: image tower + projector trained with 0.75·ArcMargin + 0.25·MCArcMargin against the frozen text tower."),
    Stage("realigned_mcip", "mcip_realign", "realign", encoder="mcip_encoder",
          summary="MCIP + realignment: the optional stage 2 on top of the MCIP image tower."),
)
VARIANTS: tuple[str, ...] = (BASELINE, *(stage.variant for stage in STAGES))


def get_stage(name: str) -> Stage:
    """The stage whose asset or variant is ``name``; the error lists the known names."""
    for stage in STAGES:
        if name in (stage.asset, stage.variant):
            return stage
    known = ", ".join(f"{s.asset} ({s.variant})" for s in STAGES)
    raise ValueError(f"unknown stage {name!r}; known stages: {known}")
