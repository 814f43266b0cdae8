"""DINOv2 import against the reference PyTorch implementation (transformers.Dinov2Model, random weights).

Our final-norm tokens must equal HF's `last_hidden_state` at the training resolution and, through position-grid
interpolation, at other resolutions; for the three namings of the weights (HF files, HF in-memory names, torch hub).
"""

import os
import re
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from vimoe import checkpoints
from vimoe.checkpoints import dinov2
from vimoe.models import build_vit, resize_position_grid

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
import convert_dinov2  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=7, mlp_ratio=2)


def perturbed(model):
  """HF initialises biases to 0 and norms / LayerScales to 1; random values everywhere expose mapping mistakes."""
  torch.manual_seed(0)
  with torch.no_grad():
    for parameter in model.parameters():
      parameter.add_(0.1 * torch.randn_like(parameter))
  return model.eval()


@pytest.fixture(scope="module")
def hf_plain(tmp_path_factory):
  model = perturbed(transformers.Dinov2Model(transformers.Dinov2Config(**TINY)))
  directory = tmp_path_factory.mktemp("hf_plain")
  model.save_pretrained(directory)  # model.safetensors with the hub names (attention.attention.query, ...)
  return model, str(directory)


def hf_features(model, images_nhwc):
  with torch.no_grad():
    return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).last_hidden_state.numpy()


def images(height, width, seed=0):
  return np.random.RandomState(seed).randn(2, height, width, 3).astype(np.float32)


features = nnx.jit(lambda model, x: model.features(x))


def check_parity(ours, reference, sizes):
  for height, width in sizes:
    x = images(height, width)
    got = np.asarray(features(ours, jnp.asarray(x)))
    want = hf_features(reference, x)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


# Training resolution (4x4 grid), larger non-square (6x5 grid: upsampling) and smaller (2x3 grid: downsampling).
SIZES = [(28, 28), (42, 35), (14, 21)]


def test_safetensors_directory_parity(hf_plain):
  reference, directory = hf_plain
  ours = checkpoints.load_dinov2(directory, num_classes=0)
  assert ours.config.grid == (4, 4) and ours.config.num_heads == 2   # heads from config.json
  check_parity(ours, reference, SIZES)


def test_in_memory_hf_names_in_pytorch_model_bin(hf_plain, tmp_path):
  reference, _ = hf_plain
  state = reference.state_dict()                  # transformers >= 5 names: attention.q_proj, ...
  assert any(".q_proj." in name for name in state)
  torch.save(state, tmp_path / "pytorch_model.bin")
  ours = checkpoints.load_dinov2(str(tmp_path), num_heads=2, num_classes=0)
  check_parity(ours, reference, SIZES[:1])


def to_torch_hub(state):
  """HF in-memory names -> facebookresearch/dinov2 names, written out independently of vimoe."""
  out = {"cls_token": state["embeddings.cls_token"], "pos_embed": state["embeddings.position_embeddings"],
         "mask_token": state["embeddings.mask_token"],
         "patch_embed.proj.weight": state["embeddings.patch_embeddings.projection.weight"],
         "patch_embed.proj.bias": state["embeddings.patch_embeddings.projection.bias"],
         "norm.weight": state["layernorm.weight"], "norm.bias": state["layernorm.bias"]}
  if "embeddings.register_tokens" in state:
    out["register_tokens"] = state["embeddings.register_tokens"]
  depth = 1 + max(int(m.group(1)) for m in map(re.compile(r"encoder\.layer\.(\d+)\.").match, state) if m)
  for i in range(depth):
    hf, hub = f"encoder.layer.{i}.", f"blocks.{i}."
    for kind in ("weight", "bias"):
      out[hub + f"attn.qkv.{kind}"] = torch.cat([state[hf + f"attention.{p}_proj.{kind}"] for p in "qkv"])
      out[hub + f"attn.proj.{kind}"] = state[hf + f"attention.o_proj.{kind}"]
      for norm in ("norm1", "norm2"):
        out[hub + f"{norm}.{kind}"] = state[hf + f"{norm}.{kind}"]
      if hf + "mlp.fc1.weight" in state:
        out[hub + f"mlp.fc1.{kind}"] = state[hf + f"mlp.fc1.{kind}"]
        out[hub + f"mlp.fc2.{kind}"] = state[hf + f"mlp.fc2.{kind}"]
      else:  # SwiGLUFFNFused: w12 = [gate; up], w3 = down
        out[hub + f"mlp.w12.{kind}"] = torch.cat([state[hf + f"mlp.gate_proj.{kind}"],
                                                  state[hf + f"mlp.up_proj.{kind}"]])
        out[hub + f"mlp.w3.{kind}"] = state[hf + f"mlp.down_proj.{kind}"]
    out[hub + "ls1.gamma"] = state[hf + "layer_scale1.lambda1"]
    out[hub + "ls2.gamma"] = state[hf + "layer_scale2.lambda1"]
  return out


def test_torch_hub_pth_parity_and_chunked_blocks(hf_plain, tmp_path):
  reference, _ = hf_plain
  hub = to_torch_hub(reference.state_dict())
  torch.save(hub, tmp_path / "dinov2_tiny.pth")
  ours = checkpoints.load_dinov2(str(tmp_path / "dinov2_tiny.pth"), num_heads=2, num_classes=0)
  check_parity(ours, reference, SIZES[:2])
  # DINOv2 training checkpoints chunk the blocks (blocks.{chunk}.{i}.*) and wrap the dict in {"teacher": ...}.
  chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m.group(1)) // 2}.{m.group(1)}.", k): v
             for k, v in hub.items()}
  assert "blocks.0.1.attn.qkv.weight" in chunked
  torch.save({"teacher": chunked}, tmp_path / "chunked.pth")
  params = dinov2.to_vit_params(dinov2.read_state_dict(str(tmp_path / "chunked.pth")))
  expected = dinov2.to_vit_params({k: v.numpy() for k, v in hub.items()})
  assert sorted(params) == sorted(expected)
  assert all(np.array_equal(params[name], expected[name]) for name in expected)


def test_swiglu_mlp_parity(tmp_path):
  config = transformers.Dinov2Config(**dict(TINY, num_hidden_layers=1, use_swiglu_ffn=True))
  reference = perturbed(transformers.Dinov2Model(config))
  reference.save_pretrained(tmp_path)   # mlp.weights_in [2H, D] = [gate; up], mlp.weights_out
  ours = checkpoints.load_dinov2(str(tmp_path), num_classes=0)
  assert ours.config.mlp_activation == "swiglu" and ours.config.mlp_dim == 48  # (int(64 * 2/3) + 7) // 8 * 8
  check_parity(ours, reference, SIZES[:1])


def test_registers_parity_with_antialiased_interpolation(tmp_path):
  config = transformers.Dinov2WithRegistersConfig(**TINY, num_register_tokens=3)
  reference = perturbed(transformers.Dinov2WithRegistersModel(config))
  reference.save_pretrained(tmp_path)
  ours = checkpoints.load_dinov2(str(tmp_path), num_classes=0)
  assert ours.config.num_registers == 3 and ours.config.posemb_interpolation == "bicubic_antialias"
  check_parity(ours, reference, SIZES)


@pytest.mark.parametrize("in_hw,out_hw,antialias,offset", [
    ((4, 4), (6, 5), False, 0.0), ((6, 6), (3, 4), False, 0.0), ((37, 37), (16, 16), False, 0.0),
    ((37, 37), (16, 16), False, 0.1),             # original DINOv2: scale_factor (16 + 0.1) / 37
    ((7, 7), (3, 5), True, 0.0), ((4, 4), (6, 9), True, 0.0), ((5, 5), (5, 5), True, 0.0),
])
def test_bicubic_matches_torch_interpolate(in_hw, out_hw, antialias, offset):
  grid = np.random.RandomState(0).randn(*in_hw, 8).astype(np.float32)       # [h, w, D]
  kwargs = (dict(scale_factor=tuple((o + offset) / i for o, i in zip(out_hw, in_hw))) if offset
            else dict(size=out_hw))
  want = torch.nn.functional.interpolate(torch.from_numpy(grid.transpose(2, 0, 1))[None], mode="bicubic",
                                         align_corners=False, antialias=antialias, **kwargs)[0].numpy()
  got = np.asarray(resize_position_grid(jnp.asarray(grid), out_hw, antialias=antialias, offset=offset))
  np.testing.assert_allclose(got.transpose(2, 0, 1), want, atol=1e-5)


def test_convert_script_and_load_pretrained(hf_plain, tmp_path):
  reference, directory = hf_plain
  output = str(tmp_path / "converted")
  assert convert_dinov2.main(["--input", directory, "--output", output, "--image_size", "42"]) == 0
  params, model_config = dinov2.restore_params(output)
  assert model_config["image_size"] == 42 and params["pos_embed"].shape == (1, 1 + 6 * 6, 32)
  # The trainer's path: a model of the fine-tuning config (with a head) initialised from the checkpoint. The grid
  # was resampled once at conversion; features equal HF interpolating at every call.
  model = build_vit(dict(model_config, num_classes=7))
  head_before = np.asarray(model.head.kernel[...])
  checkpoints.load_pretrained(model, output)
  check_parity(model, reference, [(42, 42)])
  np.testing.assert_array_equal(np.asarray(model.head.kernel[...]), head_before)   # the fresh head is kept


def test_errors_name_the_file_and_the_keys(hf_plain, tmp_path):
  reference, directory = hf_plain
  with pytest.raises(FileNotFoundError, match="no_such.pth"):
    checkpoints.load_dinov2(str(tmp_path / "no_such.pth"))
  with pytest.raises(FileNotFoundError, match="without model.safetensors or pytorch_model.bin"):
    checkpoints.load_dinov2(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="not a vimoe parameter checkpoint: params is missing"):
    dinov2.restore_params(str(tmp_path))
  hub = {k: v.numpy() for k, v in to_torch_hub(reference.state_dict()).items()}
  with pytest.raises(ValueError, match=r"unexpected keys .*'blocks.0.attn.rope.weight'"):
    dinov2.to_vit_params(dict(hub, **{"blocks.0.attn.rope.weight": np.zeros(3)}))
  params = dinov2.to_vit_params({k: v for k, v in hub.items() if k != "blocks.1.norm2.weight"})
  model = checkpoints.load_dinov2(directory, num_classes=0)
  with pytest.raises(ValueError, match=r"missing \['blocks.1.norm2.scale'\]"):
    checkpoints.load_pretrained(model, _save(tmp_path, params))
  wrong = dict(dinov2.to_vit_params(hub), **{"blocks.0.attn.qkv.kernel": np.zeros((32, 64), np.float32)})
  with pytest.raises(ValueError, match=r"blocks.0.attn.qkv.kernel has shape \(32, 64\), the model expects \(32, 96\)"):
    checkpoints.load_pretrained(model, _save(tmp_path, wrong))


def _save(tmp_path, params):
  path = str(tmp_path / f"ck{len(os.listdir(tmp_path))}")
  dinov2.save_params(path, params, {})
  return path
