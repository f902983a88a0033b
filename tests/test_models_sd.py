"""The real-model loading paths on tiny models of the real SD1.5 / SDXL architectures.

Every model here has the published component structure (craft.models.architectures, tiny widths), the
real CLIP BPE vocabulary, random weights, and is written in a real on-disk layout: a diffusers
folder as the published SD1.5 repo has it, an SDXL folder, a Hugging Face cache snapshot. All of
it is loaded through craft.models.loading with the network switched off, then generates and trains
through craft.stages.generation / craft.methods.training. Single-file checkpoints: test_models_single_file.py.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

import sd_fixtures as sf
from conftest import tiny_config
from sd_fixtures import (PROMPTS, batched_equals_alone, images, offline,  # noqa: F401
                         states_equal)
from craft import CraftError
from craft.stages.generation import images_to_array
from craft.models.loading import (MissingWeightsError, detect_family, load_from_config, load_pipeline,
                          resolve_device, resolve_dtype)



@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd-architectures")
    sd15, sdxl = sf.build("sd15", root), sf.build("sdxl", root)
    sf.save_sd15_layout(sd15, root / "sd15")
    sdxl.save_pretrained(root / "sdxl", safe_serialization=True)
    return SimpleNamespace(root=root, sd15=sd15, sdxl=sdxl, sd15_dir=root / "sd15",
                           sdxl_dir=root / "sdxl")


@pytest.fixture(scope="module")
def loaded(world) -> SimpleNamespace:
    """Each folder loaded once through craft.models.loading (CPU, dtype auto). Do not mutate."""
    return SimpleNamespace(sd15=load_pipeline(world.sd15_dir), sdxl=load_pipeline(world.sdxl_dir))


@pytest.fixture(scope="module")
def frames(world) -> dict[str, pd.DataFrame]:
    """Per family, four of the model's own images as a training set (what CRAFT trains on)."""
    from PIL import Image

    out = {}
    for family in ("sd15", "sdxl"):
        arrays = images(getattr(world, family), PROMPTS * 2, [1, 2, 3, 4], batch_size=4)
        paths = [str(world.root / f"{family}-{i}.png") for i in range(len(arrays))]
        for arr, path in zip(arrays, paths):
            Image.fromarray(arr).save(path)
        out[family] = pd.DataFrame({"image_path": paths, "prompt": PROMPTS * 2,
                                    "weight": [1.0, 0.5, 2.0, 1.0]})
    return out


def _cfg(model_dir, **extra):
    over = {"model.family": "auto", "train.lr": 1e-3, "train.weight_decay": 0.0,
            "train.checkpoint_every": 0, "train.cond_dropout": 0.25}
    over.update(extra)
    return tiny_config(str(model_dir), **over)


# ------------------------------------------------------------------------ SD1.5 family


def test_sd15_folder_in_the_published_layout_loads_and_generates(world, loaded):
    """The published layout lists a safety checker whose weights are not needed; the real
    CLIP vocabulary, scheduler and weights come through; CPU + dtype auto is float32; images
    are per-candidate seeded (batched == alone)."""
    assert detect_family(world.sd15_dir) == "sd15"
    assert (world.sd15_dir / "tokenizer" / "merges.txt").exists()
    pipe = loaded.sd15
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert pipe.safety_checker is None and not (world.sd15_dir / "safety_checker").exists()
    assert pipe.device.type == "cpu"
    assert {p.dtype for m in (pipe.unet, pipe.vae, pipe.text_encoder)
            for p in m.parameters()} == {torch.float32}
    assert len(pipe.tokenizer) == 49408 and pipe.tokenizer.model_max_length == 77
    from reward_fixtures import clip_tokenizer
    assert pipe.tokenizer(PROMPTS[0]).input_ids == clip_tokenizer()(PROMPTS[0]).input_ids
    assert type(pipe.scheduler).__name__ == "PNDMScheduler"
    for name in ("unet", "vae", "text_encoder"):
        assert states_equal(getattr(pipe, name), getattr(world.sd15, name)), name
    batched_equals_alone(pipe)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora+grad-checkpointing"])
def test_sd15_trains_two_steps_and_final_loads(world, loaded, frames, tmp_path, monkeypatch,
                                               lora):
    """Full fine-tuning changes every UNet parameter; LoRA (here with gradient checkpointing,
    which must really be used and must not cut the adapters' gradients) changes exactly the
    attention projections it targets. final/ is a complete SD1.5 pipeline."""
    from craft.methods.training import train

    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    pipe = loaded.sd15
    extra = {"train.lora": True, "train.lora_rank": 4, "model.gradient_checkpointing": True} \
        if lora else {}
    result = train(_cfg(world.sd15_dir, **extra), frames["sd15"], tmp_path / "out", pipe=pipe)
    assert result.status == "done" and result.steps_done == 2
    assert bool(calls) == lora
    # as evaluation loads it: the base's settings, but not its weight variant (fp16 here)
    base_cfg = _cfg(world.sd15_dir, **{"model.variant": "fp16"}).model
    tuned = load_from_config(base_cfg, pretrained=str(result.final_dir))
    assert type(tuned).__name__ == "StableDiffusionPipeline"
    assert states_equal(tuned.text_encoder, world.sd15.text_encoder)
    base = world.sd15.unet.state_dict()
    changed = {k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base[k])}
    if lora:
        targets = {k for k in base if any(f".{t}.weight" in k
                                          for t in ("to_q", "to_k", "to_v", "to_out.0"))}
        assert changed == targets
    else:
        assert changed == set(base)


# ------------------------------------------------------------------------ SDXL


def test_sdxl_folder_loads_and_generates_batched_with_per_candidate_seeds(world, loaded):
    assert detect_family(world.sdxl_dir) == "sdxl"
    pipe = loaded.sdxl
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    # the added-conditioning width is the pooled projection + 6 time ids
    unet = pipe.unet.config
    assert pipe.unet.add_embedding.linear_1.in_features == (
        pipe.text_encoder_2.config.projection_dim + 6 * unet.addition_time_embed_dim)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        assert states_equal(getattr(pipe, name), getattr(world.sdxl, name)), name
    batched_equals_alone(pipe)


def test_sdxl_training_conditioning_is_what_the_pipeline_feeds_its_unet(world):
    """encode_text gives the UNet exactly the hidden states, pooled embeddings and time ids the
    pipeline's own call uses, also at a non-square, non-native size."""
    from craft.methods.training import encode_text

    pipe = world.sdxl
    seen = {}

    def grab(module, args, kwargs):
        seen.update(hidden=kwargs["encoder_hidden_states"], **kwargs["added_cond_kwargs"])

    handle = pipe.unet.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            pipe(PROMPTS, height=96, width=64, num_inference_steps=1, guidance_scale=1.0,
                 output_type="latent")
    finally:
        handle.remove()
    ours = encode_text(pipe, PROMPTS, "cpu", size=(96, 64))
    assert ours["time_ids"].tolist() == [[96, 64, 0, 0, 96, 64]] * 2
    assert torch.equal(ours["time_ids"], seen["time_ids"])
    assert torch.equal(ours["text_embeds"], seen["text_embeds"])
    assert torch.equal(ours["hidden"], seen["hidden"])
    assert ours["hidden"].shape[-1] == pipe.unet.config.cross_attention_dim == 32 + 64
    native = encode_text(pipe, PROMPTS[:1], "cpu")["time_ids"]
    assert native.tolist() == [[64, 64, 0, 0, 64, 64]]


def test_sdxl_trains_two_steps_and_final_loads_as_sdxl(world, loaded, frames, tmp_path):
    from craft.methods.training import train

    pipe = loaded.sdxl
    result = train(_cfg(world.sdxl_dir), frames["sdxl"], tmp_path / "out", pipe=pipe)
    assert result.status == "done" and result.steps_done == 2
    tuned = load_pipeline(result.final_dir)
    assert type(tuned).__name__ == "StableDiffusionXLPipeline"
    assert json.loads((result.final_dir / "model_index.json").read_text())[
        "force_zeros_for_empty_prompt"] is True
    for name in ("text_encoder", "text_encoder_2", "vae"):
        assert states_equal(getattr(tuned, name), getattr(world.sdxl, name)), name
    base = world.sdxl.unet.state_dict()
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, base[k])]
    assert len(changed) == len(base)
    assert images_to_array(tuned(PROMPTS[0], num_inference_steps=2).images).std() > 0


# ------------------------------------------------------------------------ hub ids, the cache


def test_hub_id_loads_from_the_cache_and_an_incomplete_snapshot_is_named(world, tmp_path):
    snap = sf.fake_hf_cache(tmp_path / "hf-cache", "craft-tests/tiny-sdxl", world.sdxl_dir)
    pipe = load_pipeline("craft-tests/tiny-sdxl")
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert states_equal(pipe.unet, world.sdxl.unet)
    for f in (snap / "text_encoder_2").glob("*.safetensors"):  # only a half-precision copy
        f.rename(f.with_suffix(".fp16.safetensors"))
    with pytest.raises(MissingWeightsError, match=r"incomplete: missing text_encoder_2/ weights"
                                                  r".*found only fp16 files: --set model.variant"
                                                  r"=fp16"):
        load_pipeline("craft-tests/tiny-sdxl")
    with pytest.raises(MissingWeightsError, match=r"fp16 weights.*model.variant=null"):
        load_pipeline(world.sd15_dir, variant="fp16")


def test_family_must_agree_with_the_files(world):
    with pytest.raises(CraftError, match="model.family='sdxl'.*sd15"):
        detect_family(world.sd15_dir, "sdxl")
    assert detect_family(world.sd15_dir, "toy") == "toy"


# ------------------------------------------------------------------------ dtype, device, memory


def test_dtype_and_device_rules():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(CraftError, match="model.dtype='float16'.*CPU"):
        resolve_dtype("float16", cpu)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        for dev in ("cuda", "cuda:1"):
            with pytest.raises(CraftError, match=rf"model.device='{dev}' but no CUDA device.*"
                                                 r"--set model.device=cpu"):
                resolve_device(dev)


def test_memory_options_from_config_are_applied(world):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from craft.models.loading import apply_memory_options

    cfg = _cfg(world.sd15_dir, **{"model.attention": "sdpa", "model.vae_tiling": True,
                                  "model.vae_slicing": True})
    pipe = load_from_config(cfg.model)
    assert pipe.vae.use_tiling and pipe.vae.use_slicing
    for module in (pipe.unet, pipe.vae):
        assert {type(p) for p in module.attn_processors.values()} == {AttnProcessor2_0}
    apply_memory_options(pipe, attention="default")
    for module in (pipe.unet, pipe.vae):
        assert {type(p) for p in module.attn_processors.values()} == {AttnProcessor}


def test_8bit_adam_needs_bitsandbytes_and_cuda(world, monkeypatch, tmp_path):
    import importlib.util

    from craft.methods.training import check_train_options, train

    cfg = _cfg(world.sd15_dir, **{"model.device": "auto", "train.use_8bit_adam": True})
    frame = pd.DataFrame({"image_path": ["x.png"], "prompt": ["a"], "weight": [1.0]})
    if importlib.util.find_spec("bitsandbytes") is None:
        # fails before the model is loaded or an image read
        with pytest.raises(CraftError, match="needs the bitsandbytes package.*pip install "
                                             "bitsandbytes.*use_8bit_adam=false"):
            train(cfg, frame, tmp_path / "out")
    if not torch.cuda.is_available():
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
        with pytest.raises(CraftError, match="use_8bit_adam=true needs a CUDA device"):
            check_train_options(cfg)


@pytest.mark.parametrize("family,counts", [
    ("sd15", {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}),
    ("sdxl", {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
              "text_encoder_2": 694_659_840})])
def test_written_out_configs_are_the_published_architectures(family, counts):
    """craft.models.architectures (used by benchmarks/gpu.py and, at tiny widths, by these tests) has
    exactly the parameter counts of the published SD1.5 / SDXL components (built on the meta
    device: no memory, no weights)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from craft.models.architectures import component_configs

    cfgs = component_configs(family)
    with torch.device("meta"):
        built = {"unet": UNet2DConditionModel(**cfgs["unet"]), "vae": AutoencoderKL(**cfgs["vae"]),
                 "text_encoder": CLIPTextModel(CLIPTextConfig(**cfgs["text_encoder"]))}
        if family == "sdxl":
            built["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig(**cfgs["text_encoder_2"]))
    assert {k: sum(p.numel() for p in m.parameters()) for k, m in built.items()} == counts


def test_written_out_flow_configs_are_the_published_architectures():
    """FLUX.1-dev's transformer has the published parameter count (11,901,408,320, that of
    flux1-dev.safetensors), T5-XXL's encoder 4,762,310,656; SD3.5-Medium's MMDiT-X has its
    published shape (24 joint blocks, the first 13 with dual attention, 24 heads x 64 = 1536,
    RMS qk-norm, 16-channel latents). Built on the meta device: no memory, no weights."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5Config, T5EncoderModel

    from craft.models.architectures import component_configs

    sd3, flux = component_configs("sd3"), component_configs("flux")
    with torch.device("meta"):
        ft = FluxTransformer2DModel(**flux["transformer"])
        t5 = T5EncoderModel(T5Config(**sd3["text_encoder_3"]))
        mm = SD3Transformer2DModel(**sd3["transformer"])
    assert sum(p.numel() for p in ft.parameters()) == 11_901_408_320
    assert sum(p.numel() for p in t5.parameters()) == 4_762_310_656
    assert len(mm.transformer_blocks) == 24 and mm.inner_dim == 1536
    assert [b.use_dual_attention for b in mm.transformer_blocks] == [True] * 13 + [False] * 11
    assert sd3["text_encoder_3"] == flux["text_encoder_2"]  # the same T5-XXL encoder
