"""The stage registry, the one settings validator, and the content hashes behind input-addressed work."""
from __future__ import annotations

import polars as pl
import pytest
import torch

from clipopt_core.registry import BASELINE, STAGES, VARIANTS, Stage, get_stage
from clipopt_core.train.config import MiningConfig, RealignConfig, RetrievalConfig, TrainConfig
from clipopt_core.runtime.digest import frame_digest
from clipopt_core.train.identity import stage_identity, weights_digest
from clipopt_core.train.schema import default_config, flat_defaults, from_dict, mining_config, stage_config

SPLITS = pl.DataFrame({"image_id": ["a", "b"], "uri": ["/x/a.png", "/x/b.png"], "label": ["cat", "dog"],
                       "split": ["train", "val"], "sha256": ["11", "22"]})


def test_registry_names_each_stage_once_and_resolves_both_names() -> None:
    assert VARIANTS[0] == BASELINE and len(set(VARIANTS)) == len(VARIANTS) == len(STAGES) + 1
    assert len({s.asset for s in STAGES}) == len(STAGES)
    assert get_stage("2sft") is get_stage("realigned_2sft")
    assert all(get_stage(s.encoder).kind != "realign" for s in STAGES if s.encoder)  # realign starts from an encoder
    with pytest.raises(ValueError, match="unknown stage 'nope'; known stages: retrieval_encoder"):
        get_stage("nope")
    with pytest.raises(ValueError, match="needs an encoder"):
        Stage("x", "x", "realign")


def test_kind_defaults_are_the_papers_recipe() -> None:
    assert default_config("retrieval") == RetrievalConfig() and RetrievalConfig().mc_weight == 0.0
    assert default_config("mcip").mc_weight == 0.25
    realign = default_config("realign")
    assert isinstance(realign, RealignConfig) and realign.train.lr == 1e-5 and realign.train.betas == (0.9, 0.98)
    assert "mc_weight" not in flat_defaults("retrieval") and flat_defaults("mcip")["mc_weight"] == 0.25
    with pytest.raises(ValueError, match="unknown stage kind"):
        default_config("stage9")


def test_stage_config_takes_flat_or_nested_settings_and_names_bad_ones() -> None:
    flat = stage_config("realign", {"lr": 1e-4, "last_blocks": 2, "betas": [0.8, 0.9]})
    nested = stage_config("realign", {"train": {"lr": 1e-4, "betas": (0.8, 0.9)}, "last_blocks": 2})
    assert flat == nested and flat.train.betas == (0.8, 0.9) and flat.train.weight_decay == 0.2  # kind default kept
    assert stage_config("retrieval", {"epochs": 2.0}).train.epochs == 2  # integral floats from JSON/YAML
    cases = {
        "TrainConfig.epochs must be ≥ 1; got 0": ("retrieval", {"epochs": 0}),
        "TrainConfig.lr must be a number; got 'fast'": ("retrieval", {"lr": "fast"}),
        "TrainConfig.epochs must be an integer; got 1.5": ("retrieval", {"epochs": 1.5}),
        "RetrievalConfig.projector must be one of 'train', 'reattach'; got 'drop'": ("retrieval", {"projector": "drop"}),
        "unknown RealignConfig field(s) proxy_lr_multiplier": ("realign", {"proxy_lr_multiplier": 1.0}),
        "mcip stage: mc_weight must be > 0": ("mcip", {"mc_weight": 0.0}),
        "retrieval stage: mc_weight cannot be set": ("retrieval", {"mc_weight": 0.25}),
        "RetrievalConfig.freeze_norm must be true or false; got 1": ("retrieval", {"freeze_norm": 1}),
        "TrainConfig.betas must be a list of 2 numbers": ("realign", {"betas": [0.9]}),
    }
    for message, (kind, settings) in cases.items():
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            stage_config(kind, settings)


def test_mining_settings_validate_like_the_stages() -> None:
    assert mining_config({"threshold": None}) == MiningConfig(threshold=None)
    with pytest.raises(ValueError, match="MiningConfig.top_k must be ≥ 1"):
        mining_config({"top_k": 0})
    assert from_dict(TrainConfig, {"max_steps": None}).max_steps is None


def test_frame_digest_is_content_not_location() -> None:
    moved = SPLITS.with_columns(pl.col("uri").str.replace("/x/", "/y/"))
    assert frame_digest(moved) == frame_digest(SPLITS)  # the same images elsewhere
    assert frame_digest(SPLITS.with_columns(pl.lit("33").alias("sha256"))) != frame_digest(SPLITS)  # other bytes
    assert frame_digest(SPLITS.reverse()) != frame_digest(SPLITS)  # order changes training
    assert frame_digest(SPLITS.select(sorted(SPLITS.columns))) == frame_digest(SPLITS)  # column order does not
    assert frame_digest(None) == "none" != frame_digest(SPLITS.head(0))


def test_frame_digest_of_a_parquet_scan_is_the_frames(tmp_path) -> None:
    """A lazy scan (a corpus too large to hold) is hashed slice by slice to the same digest; a changed row changes it."""
    frame = pl.DataFrame({"uri": [f"/x/{i}.png" for i in range(250_001)], "caption": [f"c{i % 977}" for i in range(250_001)]})
    frame.write_parquet(tmp_path / "pairs.parquet")
    assert frame_digest(pl.scan_parquet(tmp_path / "pairs.parquet")) == frame_digest(frame)
    frame.with_columns(pl.when(pl.int_range(pl.len()) == 200_000).then(pl.lit("edited")).otherwise("caption")
                       .alias("caption")).write_parquet(tmp_path / "edited.parquet")
    assert frame_digest(pl.scan_parquet(tmp_path / "edited.parquet")) != frame_digest(frame)


def test_weights_digest_sees_every_tensor() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    before = weights_digest(model)
    assert weights_digest(model) == before
    model[1].running_mean += 1e-6  # a buffer counts, not only parameters
    assert weights_digest(model) != before


def test_stage_identity_changes_with_every_input() -> None:
    config = stage_config("retrieval")
    base = stage_identity("retrieval", config, start_weights="w", inputs={"splits": SPLITS})
    assert base == stage_identity("retrieval", config, start_weights="w", inputs={"splits": SPLITS})
    changed = [
        stage_identity("mcip", config, start_weights="w", inputs={"splits": SPLITS}),
        stage_identity("retrieval", stage_config("retrieval", {"seed": 1}), start_weights="w", inputs={"splits": SPLITS}),
        stage_identity("retrieval", config, start_weights="v", inputs={"splits": SPLITS}),
        stage_identity("retrieval", config, start_weights="w", inputs={"splits": SPLITS.with_columns(pl.lit("x").alias("label"))}),
        stage_identity("retrieval", config, start_weights="w", inputs={"splits": SPLITS, "pseudo_captions": SPLITS}),
    ]
    assert len({base, *changed}) == len(changed) + 1


def test_proxy_sharding_is_not_part_of_the_identity_but_proxy_dtype_is() -> None:
    def identity(kind: str, settings: dict) -> str:
        return stage_identity(kind, stage_config(kind, settings), start_weights="w", inputs={"splits": SPLITS})

    for kind in ("retrieval", "mcip"):  # where the proxies live does not change the trained weights
        assert identity(kind, {"proxy_sharding": "sharded"}) == identity(kind, {})
        assert identity(kind, {"proxy_dtype": "bf16"}) != identity(kind, {})  # bf16 products change them
    assert stage_config("mcip", {"proxy_sharding": "sharded", "proxy_dtype": "bf16"}).proxy_sharding == "sharded"
    with pytest.raises(ValueError, match="RetrievalConfig.proxy_sharding must be one of 'replicated', 'sharded'; got 'split'"):
        stage_config("retrieval", {"proxy_sharding": "split"})
    with pytest.raises(ValueError, match="unknown RealignConfig field.s. proxy_dtype"):
        stage_config("realign", {"proxy_dtype": "bf16"})
