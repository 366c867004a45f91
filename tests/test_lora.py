"""MUMU's SDXL UNet LoRA: inject, export (diffusers format), merge into another SDXL UNet."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mumu_model.lora import (
    LORA_WEIGHT_NAME,
    UNET_LORA_TARGETS,
    add_unet_lora,
    combine_unet_loras,
    concat_lora_modules,
    export_unet_lora,
    has_peft_layers,
    load_unet_lora,
    lora_provenance,
    merge_lora_into_pipeline,
    merge_unet_lora,
)

RANK, ALPHA = 4, 8


def _tiny_unet_config(**overrides) -> dict:
    # SDXL's architecture in miniature: text_time added conditioning, a cross-attention down and
    # up block with 2 transformer layers, linear projections. Pooled dim 32 + 6 time ids * 8 = 80.
    config = dict(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        norm_num_groups=8,
        use_linear_projection=True,
    )
    config.update(overrides)
    return config


@pytest.fixture
def make_unet():
    def make(seed: int = 0, **overrides) -> UNet2DConditionModel:
        torch.manual_seed(seed)
        return UNet2DConditionModel(**_tiny_unet_config(**overrides)).eval()

    return make


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(123)
    return dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)},
    )


def _run(unet, inputs) -> torch.Tensor:
    with torch.no_grad():
        return unet(**inputs).sample


def _randomize_lora_B(unet, seed: int = 7) -> None:
    # peft's "gaussian" init leaves B = 0 (a LoRA'd UNet starts as the base UNet); a trained
    # LoRA has non-zero B, so give it random values.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture
def trained_lora(make_unet, tmp_path):
    """(base UNet, its LoRA'd copy with non-zero B, exported LoRA folder)."""
    base = make_unet(seed=0)
    lora_unet = add_unet_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA)
    _randomize_lora_B(lora_unet)
    out = export_unet_lora(lora_unet, tmp_path / "mumu_lora")
    return base, lora_unet, out


def _targeted(name: str) -> bool:
    return any(name.endswith("." + t) for t in UNET_LORA_TARGETS)


def test_tiny_sdxl_unet_runs_with_text_time_conditioning(make_unet, inputs):
    out = _run(make_unet(), inputs)
    assert out.shape == (2, 4, 8, 8)
    assert torch.isfinite(out).all()


def test_add_unet_lora_targets_attention_projections_and_starts_as_identity(make_unet, inputs):
    base = make_unet()
    expected = _run(base, inputs)
    unet = add_unet_lora(copy.deepcopy(base), rank=RANK, alpha=ALPHA)
    config = unet.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (RANK, ALPHA, "gaussian")
    assert set(config.target_modules) == set(UNET_LORA_TARGETS)
    lora_modules = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A." in n}
    linear_targets = {
        n for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and _targeted(n)
    }
    assert lora_modules == linear_targets and len(lora_modules) == 4 * 2 * 8  # 4 proj x 2 attn x 8 transformer blocks
    torch.testing.assert_close(_run(unet, inputs), expected)  # B = 0 at init
    assert add_unet_lora(make_unet(), rank=8).peft_config["default"].lora_alpha == 8  # alpha defaults to rank


def test_export_writes_diffusers_format_with_alpha_metadata(trained_lora):
    _, lora_unet, out = trained_lora
    assert sorted(p.name for p in out.iterdir()) == [LORA_WEIGHT_NAME]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers
    with safe_open(str(out / LORA_WEIGHT_NAME), framework="pt") as f:
        keys = list(f.keys())
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in keys)
    assert len(keys) == 2 * sum(1 for n, _ in lora_unet.named_parameters() if ".lora_A." in n)
    assert (meta["unet.r"], meta["unet.lora_alpha"]) == (RANK, ALPHA)
    # Re-export replaces the folder atomically.
    assert export_unet_lora(lora_unet, out) == out
    assert sorted(p.name for p in out.iterdir()) == [LORA_WEIGHT_NAME]


def _sdxl_pipeline(unet) -> StableDiffusionXLPipeline:
    """diffusers' SDXL pipeline around ``unet``: a tiny VAE, no text encoders (the LoRA is UNet-only)."""
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=8,
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=None,
        text_encoder_2=None,
        tokenizer=None,
        tokenizer_2=None,
        unet=unet,
        scheduler=EulerDiscreteScheduler(),
    )


def test_exported_lora_loads_into_sdxl_pipeline_and_reproduces_the_lora_unet(trained_lora, inputs):
    base, lora_unet, out = trained_lora
    pipe = _sdxl_pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(str(out))
    (config,) = pipe.unet.peft_config.values()
    assert (config.r, config.lora_alpha) == (RANK, ALPHA)  # alpha survived via the metadata

    base_out = _run(base, inputs)
    loaded_out = _run(pipe.unet, inputs)
    assert not torch.allclose(loaded_out, base_out, atol=1e-3)
    torch.testing.assert_close(loaded_out, _run(lora_unet, inputs), rtol=1e-5, atol=1e-5)


def test_merge_is_exactly_w_plus_scaled_ba_and_touches_nothing_else(trained_lora, make_unet, inputs, tmp_path):
    _, lora_unet, out = trained_lora
    community = make_unet(seed=1)  # a "style fine-tune": same architecture, different weights
    before = {k: v.clone() for k, v in community.state_dict().items()}
    lora = load_file(str(out / LORA_WEIGHT_NAME))
    scale = 0.7

    assert merge_unet_lora(community, out, scale=scale) is community
    assert not has_peft_layers(community)

    after = community.state_dict()
    assert after.keys() == before.keys()
    merged = set()
    for key, w in before.items():
        module = key.removesuffix(".weight")
        down = f"unet.{module}.lora.down.weight"
        if key.endswith(".weight") and down in lora:
            A, B = lora[down], lora[f"unet.{module}.lora.up.weight"]
            assert A.shape[0] == RANK
            expected = w + scale * (ALPHA / RANK) * B @ A
            assert torch.allclose(after[key], expected, atol=1e-6), key
            assert not torch.equal(after[key], w), key
            merged.add(module)
        else:
            assert torch.equal(after[key], w), key  # bit-identical
    lora_modules = {k.removeprefix("unet.").removesuffix(".lora.down.weight") for k in lora if ".lora.down." in k}
    assert merged == lora_modules
    assert merged == {n for n, m in community.named_modules() if isinstance(m, torch.nn.Linear) and _targeted(n)}

    # The merged UNet is a plain UNet: it saves and reloads like any other.
    community.save_pretrained(tmp_path / "merged_unet")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "merged_unet").eval()
    torch.testing.assert_close(_run(reloaded, inputs), _run(community, inputs), rtol=0, atol=0)


def test_merge_agrees_with_diffusers_load_fuse_unload(trained_lora, make_unet):
    # Cross-check our reading of the file (keys, alpha from metadata) with diffusers' own path.
    _, _, out = trained_lora
    ours = merge_unet_lora(make_unet(seed=1), out, scale=0.7)
    theirs = make_unet(seed=1)
    # NB: ModelMixin.load_lora_adapter(dir) only looks for the .bin file unless told the name
    # (StableDiffusionXLPipeline.load_lora_weights(dir) finds the .safetensors on its own).
    theirs.load_lora_adapter(str(out), weight_name=LORA_WEIGHT_NAME, prefix="unet", adapter_name="mumu")
    assert theirs.peft_config["mumu"].lora_alpha == ALPHA
    theirs.fuse_lora(lora_scale=0.7)
    theirs.unload_lora()
    assert not has_peft_layers(theirs)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for key in ours_sd:
        torch.testing.assert_close(ours_sd[key], theirs_sd[key], rtol=0, atol=1e-6, msg=key)


def test_merge_lora_file_path_and_lora_unet_equivalence(trained_lora, make_unet, inputs):
    # Merging into the *base* UNet at scale 1 gives the LoRA'd UNet's function.
    base, lora_unet, out = trained_lora
    merged = merge_unet_lora(copy.deepcopy(base), out / LORA_WEIGHT_NAME, scale=1.0)
    torch.testing.assert_close(_run(merged, inputs), _run(lora_unet, inputs), rtol=1e-5, atol=1e-5)


def test_merge_with_scale_zero_leaves_weights_unchanged(trained_lora, make_unet):
    _, _, out = trained_lora
    community = make_unet(seed=1)
    before = {k: v.clone() for k, v in community.state_dict().items()}
    merge_unet_lora(community, out, scale=0.0)
    after = community.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_merge_errors(trained_lora, make_unet, tmp_path):
    _, lora_unet, out = trained_lora
    community = make_unet(seed=1)
    before = {k: v.clone() for k, v in community.state_dict().items()}

    with pytest.raises(ValueError, match="does not exist"):
        merge_unet_lora(community, tmp_path / "nope.safetensors")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match="no pytorch_lora_weights.safetensors"):
        merge_unet_lora(community, empty)
    pickled = tmp_path / "lora.bin"
    torch.save({}, pickled)
    with pytest.raises(ValueError, match="not a .safetensors file"):
        merge_unet_lora(community, pickled)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="garbage.safetensors"):
        merge_unet_lora(community, garbage)

    # Keys that name no module of the target UNet.
    sd = load_file(str(out / LORA_WEIGHT_NAME))
    bogus = tmp_path / "bogus.safetensors"
    save_file({k.replace("attn1", "attn9"): v for k, v in sd.items()}, str(bogus))
    with pytest.raises(ValueError, match=r"bogus\.safetensors.*match no module"):
        merge_unet_lora(community, bogus)

    # A LoRA for another architecture: same module names, other widths.
    other = add_unet_lora(make_unet(block_out_channels=(32, 32), attention_head_dim=(2, 2)), rank=RANK)
    _randomize_lora_B(other)
    other_dir = export_unet_lora(other, tmp_path / "other_arch")
    with pytest.raises(ValueError, match="shapes .* do not match"):
        merge_unet_lora(community, other_dir)
    # ... and one with more transformer layers than the target has.
    deeper = add_unet_lora(make_unet(transformer_layers_per_block=(1, 3)), rank=RANK)
    with pytest.raises(ValueError, match="match no module"):
        merge_unet_lora(community, export_unet_lora(deeper, tmp_path / "deeper"))

    # Merging into a UNet that still carries peft layers is refused.
    with pytest.raises(ValueError, match="peft"):
        merge_unet_lora(lora_unet, out)

    # None of the failures touched the target.
    after = community.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_export_without_adapter_is_refused(make_unet, tmp_path):
    with pytest.raises(ValueError, match="no LoRA adapter"):
        export_unet_lora(make_unet(), tmp_path / "x")
    assert not (tmp_path / "x").exists()
    assert not list(tmp_path.iterdir())  # no temp dir left behind


def test_merge_lora_into_pipeline(tmp_path):
    from mumu_model.pipeline import MUMUPipeline
    from mumu_model.testing import tiny_pipeline

    pipe_dir = tiny_pipeline(tmp_path / "mumu")
    pipe = MUMUPipeline.from_pretrained(pipe_dir)

    # The MUMU LoRA, trained on the pipeline's own UNet.
    lora_unet = add_unet_lora(copy.deepcopy(pipe.unet), rank=RANK, alpha=ALPHA)
    _randomize_lora_B(lora_unet)
    lora_dir = export_unet_lora(lora_unet, tmp_path / "mumu_lora")

    # A community fine-tune of the same architecture, saved as a full pipeline folder (unet/).
    torch.manual_seed(99)
    community = UNet2DConditionModel.from_config(pipe.unet.config)
    community.save_pretrained(tmp_path / "community" / "unet")

    out = merge_lora_into_pipeline(pipe_dir, lora_dir, tmp_path / "community", tmp_path / "merged", scale=0.5)
    assert out == tmp_path / "merged"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    merged = MUMUPipeline.from_pretrained(out)
    expected = merge_unet_lora(UNet2DConditionModel.from_pretrained(tmp_path / "community" / "unet"), lora_dir, 0.5)
    got_sd, exp_sd = merged.unet.state_dict(), expected.state_dict()
    assert got_sd.keys() == exp_sd.keys()
    assert all(torch.equal(got_sd[k], exp_sd[k]) for k in exp_sd)
    assert not has_peft_layers(merged.unet)
    # The other components are the MUMU pipeline's own.
    for name in ("adapter", "vae"):
        a, b = getattr(merged, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in b), name

    # A bare UNet folder works too, and so does replacing an existing output.
    merge_lora_into_pipeline(pipe_dir, lora_dir, tmp_path / "community" / "unet", out, scale=0.5)
    again = MUMUPipeline.from_pretrained(out).unet.state_dict()
    assert all(torch.equal(again[k], exp_sd[k]) for k in exp_sd)



# -- the LoRAs of successive training stages, combined --------------------------------------------

# Stage 1 and stage 2 adapt overlapping layer sets, so the combined LoRA has layers of rank R1
# (to_q: stage 1 only), R2 (to_out.0: stage 2 only) and R1 + R2 (to_k, to_v) side by side.
R1, R2 = 4, 2
STAGE1_TARGETS = ("to_q", "to_k", "to_v")
STAGE2_TARGETS = ("to_k", "to_v", "to_out.0")


def _fused(lora_unet) -> UNet2DConditionModel:
    """A plain UNet with ``lora_unet``'s adapter merged by peft (the reference, not our code)."""
    unet = copy.deepcopy(lora_unet)
    unet.fuse_lora()
    unet.unload_lora()
    assert not has_peft_layers(unet)
    return unet


def _assert_same_weights(got, expected) -> None:
    got_sd, exp_sd = got.state_dict(), expected.state_dict()
    assert got_sd.keys() == exp_sd.keys()
    for key in exp_sd:
        assert torch.allclose(got_sd[key], exp_sd[key], rtol=1e-5, atol=1e-6), key


def _target_of(module_name: str) -> str:
    return next(t for t in UNET_LORA_TARGETS if module_name.endswith("." + t))


def _first_weight(unet, target: str) -> torch.Tensor:
    return next(m.weight for n, m in unet.named_modules() if n.endswith("." + target))


@pytest.fixture(params=[(R1, R2), (8, 1)], ids=["alpha=rank", "alpha!=rank"])
def two_stages(request, make_unet, tmp_path):
    """Stage 1 trained on the base UNet, stage 2 on stage 1's merged UNet, as MUMU's trainer does.

    A dict: base, stage1_dir (stage 1's exported LoRA), stage2 (the UNet carrying stage 2's
    LoRA), stage2_unet (stage 2's result: that LoRA merged by peft), alphas."""
    alpha1, alpha2 = request.param
    base = make_unet(seed=0)
    stage1 = add_unet_lora(copy.deepcopy(base), rank=R1, alpha=alpha1, targets=STAGE1_TARGETS)
    _randomize_lora_B(stage1, seed=7)
    stage1_dir = export_unet_lora(stage1, tmp_path / "stage1" / "unet_lora", base="tiny-sdxl-base")

    # Stage 1's exported LoRA merged into the base is stage 1's UNet (its pipeline/).
    stage1_unet = merge_unet_lora(copy.deepcopy(base), stage1_dir)
    _assert_same_weights(stage1_unet, _fused(stage1))

    stage2 = add_unet_lora(copy.deepcopy(stage1_unet), rank=R2, alpha=alpha2, targets=STAGE2_TARGETS)
    _randomize_lora_B(stage2, seed=8)
    return dict(base=base, stage1_dir=stage1_dir, stage2=stage2, stage2_unet=_fused(stage2), alphas=(alpha1, alpha2))


def test_single_stage_export_records_its_stage(two_stages):
    record = lora_provenance(two_stages["stage1_dir"])
    assert record == {
        "base": "tiny-sdxl-base",
        "stages": [{"rank": R1, "alpha": two_stages["alphas"][0], "modules": 3 * 2 * 8, "source": None}],
    }
    _, _, config = load_unet_lora(two_stages["stage1_dir"])
    assert (config["r"], config["lora_alpha"]) == (R1, two_stages["alphas"][0])  # the adapter's own config


def test_stage2_export_with_previous_merges_into_the_base_as_the_stage2_unet(two_stages, tmp_path):
    base, stage1_dir, stage2 = two_stages["base"], two_stages["stage1_dir"], two_stages["stage2"]
    out = export_unet_lora(stage2, tmp_path / "stage2" / "unet_lora", previous=stage1_dir)
    assert sorted(p.name for p in out.iterdir()) == [LORA_WEIGHT_NAME]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers

    _assert_same_weights(merge_unet_lora(copy.deepcopy(base), out), two_stages["stage2_unet"])
    # ... which the last stage's LoRA alone does not do: it would lose stage 1.
    alone = merge_unet_lora(copy.deepcopy(base), export_unet_lora(stage2, tmp_path / "stage2_alone"))
    assert not torch.allclose(_first_weight(alone, "to_q"), _first_weight(two_stages["stage2_unet"], "to_q"))

    _, modules, config = load_unet_lora(out)
    assert len(modules) == 4 * 2 * 8
    by_target = {}
    for name, entry in modules.items():
        by_target.setdefault(_target_of(name), set()).add((entry["A"].shape[0], entry["B"].shape[1]))
    assert by_target == {"to_q": {(R1, R1)}, "to_k": {(R1 + R2, R1 + R2)}, "to_v": {(R1 + R2, R1 + R2)},
                         "to_out.0": {(R2, R2)}}
    # Scale 1 everywhere: alpha = rank, per module where the rank is not the most common one.
    assert config["lora_alpha"] == config["r"] and config["alpha_pattern"] == config["rank_pattern"]
    assert config["rank_pattern"] and not config.get("use_rslora")

    alpha1, alpha2 = two_stages["alphas"]
    assert lora_provenance(out) == {
        "base": "tiny-sdxl-base",  # inherited from the previous stage's record
        "stages": [
            {"rank": R1, "alpha": alpha1, "modules": 3 * 2 * 8, "source": None},
            {"rank": R2, "alpha": alpha2, "modules": 3 * 2 * 8, "source": None},
        ],
    }


def test_combined_lora_loads_and_fuses_in_diffusers_sdxl_pipeline(two_stages, tmp_path):
    base, stage2 = two_stages["base"], two_stages["stage2"]
    out = export_unet_lora(stage2, tmp_path / "unet_lora", previous=two_stages["stage1_dir"])
    _, modules, _ = load_unet_lora(out)

    pipe = _sdxl_pipeline(copy.deepcopy(base))
    pipe.load_lora_weights(str(out), adapter_name="mumu")
    # Every layer got its own rank (R1, R2 or R1 + R2 side by side) and scale 1.
    for name, entry in modules.items():
        layer = pipe.unet.get_submodule(name)
        assert layer.r["mumu"] == entry["A"].shape[0], name
        assert layer.scaling["mumu"] == 1.0, name
    pipe.fuse_lora(components=["unet"])
    pipe.unload_lora_weights()
    assert not has_peft_layers(pipe.unet)
    _assert_same_weights(pipe.unet, two_stages["stage2_unet"])


def test_three_stages_and_in_memory_sources(two_stages, make_unet, tmp_path):
    from peft.utils import get_peft_model_state_dict

    base, stage1_dir, stage2 = two_stages["base"], two_stages["stage1_dir"], two_stages["stage2"]
    stage12 = export_unet_lora(stage2, tmp_path / "stage12", previous=stage1_dir)
    # The same from a state dict and config in memory, and from the UNet itself: identical files.
    state = get_peft_model_state_dict(stage2)
    from_state = combine_unet_loras([stage1_dir, (state, stage2.peft_config["default"].to_dict())],
                                    tmp_path / "from_state")
    from_unet = combine_unet_loras([stage1_dir, stage2], tmp_path / "from_unet", base="explicit")
    reference = load_file(str(stage12 / LORA_WEIGHT_NAME))
    for folder in (from_state, from_unet):
        got = load_file(str(folder / LORA_WEIGHT_NAME))
        assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    assert lora_provenance(from_unet)["base"] == "explicit"

    # Stage 3 from stage 2's result, exported with stage 2's combined LoRA as previous.
    stage3 = add_unet_lora(copy.deepcopy(two_stages["stage2_unet"]), rank=3, alpha=6, targets=("to_q",))
    _randomize_lora_B(stage3, seed=9)
    out = export_unet_lora(stage3, tmp_path / "stage3", previous=stage12)
    _assert_same_weights(merge_unet_lora(copy.deepcopy(base), out), _fused(stage3))
    assert [s["rank"] for s in lora_provenance(out)["stages"]] == [R1, R2, 3]
    _, modules, _ = load_unet_lora(out)
    assert {e["A"].shape[0] for n, e in modules.items() if _target_of(n) == "to_q"} == {R1 + 3}


def test_concat_is_exact_sum_of_scaled_deltas():
    g = torch.Generator().manual_seed(0)
    A1, B1 = torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    A2, B2 = torch.randn(2, 5, generator=g), torch.randn(7, 2, generator=g)
    stages = [({"m": {"A": A1, "B": B1, "alpha": None}}, {"lora_alpha": 6}),
              ({"m": {"A": A2, "B": B2, "alpha": None}, "n": {"A": A2, "B": B2, "alpha": None}}, {"lora_alpha": 1})]
    out = concat_lora_modules(stages)
    assert list(out) == ["m", "n"] and out["m"]["A"].shape == (5, 5) and out["m"]["alpha"] == 5.0
    torch.testing.assert_close(out["m"]["B"] @ out["m"]["A"], (6 / 3) * B1 @ A1 + (1 / 2) * B2 @ A2)
    torch.testing.assert_close(out["n"]["B"] @ out["n"]["A"], (1 / 2) * B2 @ A2)


def test_combine_errors(two_stages, make_unet, tmp_path):
    stage1_dir, stage2 = two_stages["stage1_dir"], two_stages["stage2"]
    out = tmp_path / "out"

    # A stage of another architecture: same module names, other widths.
    other = add_unet_lora(make_unet(block_out_channels=(32, 32), attention_head_dim=(2, 2)), rank=R1)
    _randomize_lora_B(other)
    other_dir = export_unet_lora(other, tmp_path / "other_arch")
    with pytest.raises(ValueError, match=r"disagree on module 'down_blocks\.1\.attentions\.0\.transformer_blocks"
                                         r"\.0\.attn1\.to_k'.*other_arch.*stage1"):
        combine_unet_loras([other_dir, stage1_dir], out)
    with pytest.raises(ValueError, match=r"disagree on module .*other_arch.*UNet adapter 'default'"):
        export_unet_lora(stage2, out, previous=other_dir)

    # A missing previous stage.
    with pytest.raises(ValueError, match="does not exist"):
        export_unet_lora(stage2, out, previous=tmp_path / "nope" / LORA_WEIGHT_NAME)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty holds no pytorch_lora_weights\.safetensors"):
        export_unet_lora(stage2, out, previous=tmp_path / "empty")
    with pytest.raises(ValueError, match="at least one"):
        combine_unet_loras([], out)
    with pytest.raises(ValueError, match="no LoRA adapter"):
        combine_unet_loras([stage1_dir, make_unet()], out)
    with pytest.raises(ValueError, match="do not fit together"):
        concat_lora_modules([({"m": {"A": torch.zeros(3, 5), "B": torch.zeros(7, 2), "alpha": None}}, {})])

    assert not out.exists()  # nothing written by a failing combine
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
