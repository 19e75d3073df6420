"""Model files: round trip, byte-reproducible, bad files are one ModelFileError, checkpoints."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from ddpm_core.config import TrainConfig
from ddpm_core.losses import Loss
from ddpm_core.modelfile import (
    FORMAT,
    ModelFileError,
    ModelSpec,
    load_model_file,
    save_model,
)
from ddpm_core.resample import ImportanceSampler, UniformSampler
from ddpm_core.training import train
from ddpm_core.unet import PRESETS

UNET = dataclasses.replace(PRESETS["digits"], base_channels=16, channel_mult=(1, 2),
                           num_res_blocks=1, attn_resolutions=(4,), out_channels=2)
SPEC = ModelSpec(UNET, "cosine", 50, "x0", "learned_range")


def _weights(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    a, b = SPEC.build_net(), SPEC.build_net()
    return {"ema": a.state_dict(), "model": b.state_dict()}


def _probe() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(3, 1, 8, 8, generator=g), torch.tensor([0, 17, 49])


def test_round_trip_rebuilds_network_and_diffusion(tmp_path: Path) -> None:
    w = _weights(0)
    save_model(tmp_path / "m.pt", SPEC, w, meta={"name": "hybrid", "step": 7})
    x, t = _probe()
    for which in ("ema", "model"):
        m = load_model_file(tmp_path / "m.pt", which)
        ref = SPEC.build_net().eval()
        ref.load_state_dict(w[which])
        with torch.no_grad():
            assert torch.equal(m.net(x, t), ref(x, t))
        assert not m.net.training
        assert m.spec == SPEC and m.meta == {"name": "hybrid", "step": 7}
        assert m.diffusion.T == 50 and m.diffusion.var_type == "learned_range"
        assert torch.equal(m.diffusion.betas, SPEC.diffusion().betas)
    assert ModelSpec.from_dict(SPEC.to_dict()) == SPEC
    blob = torch.load(tmp_path / "m.pt", weights_only=True)
    assert blob["format"] == FORMAT


def test_identical_weights_give_byte_identical_files(tmp_path: Path) -> None:
    save_model(tmp_path / "a.pt", SPEC, _weights(0), meta={"step": 1})
    save_model(tmp_path / "b.pt", SPEC, _weights(0), meta={"step": 1})
    save_model(tmp_path / "c.pt", SPEC, _weights(1), meta={"step": 1})
    sha = {n: hashlib.sha256((tmp_path / f"{n}.pt").read_bytes()).hexdigest() for n in "abc"}
    assert sha["a"] == sha["b"] != sha["c"]


def test_spec_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="output channels"):
        ModelSpec(UNET, "linear", 50, "eps", "fixed_large")  # 2 output channels, 1 needed
    with pytest.raises(ValueError, match="schedule"):
        ModelSpec(UNET, "sigmoid", 50, "eps", "learned")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="meta"):
        save_model("unused.pt", SPEC, _weights(0), meta={"x": object()})


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    good = tmp_path / "good.pt"
    save_model(good, SPEC, _weights(0))
    raw = good.read_bytes()
    files = {"missing": tmp_path / "absent.pt"}
    files["empty"] = tmp_path / "empty.pt"
    files["empty"].write_bytes(b"")
    files["truncated"] = tmp_path / "truncated.pt"
    files["truncated"].write_bytes(raw[: len(raw) // 2])
    files["text"] = tmp_path / "notes.pt"
    files["text"].write_text("just some text\n")
    files["foreign"] = tmp_path / "foreign.pt"
    torch.save({"state_dict": _weights(0)["ema"]}, files["foreign"])
    files["other_format"] = tmp_path / "other.pt"
    torch.save({"format": "ddpm-pipeline-model/1"}, files["other_format"])
    files["torch_payload"] = tmp_path / "evil_torch.pt"
    torch.save({"format": FORMAT, "x": _Payload(tmp_path / "pwned_torch")},
               files["torch_payload"])
    files["pickle_payload"] = tmp_path / "evil_pickle.pt"
    files["pickle_payload"].write_bytes(pickle.dumps(_Payload(tmp_path / "pwned_pickle")))
    # one flipped bit in the weights: torch.load alone would load it without a word
    files["corrupt"] = tmp_path / "corrupt.pt"
    with zipfile.ZipFile(good) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the largest tensor record
    flipped = bytearray(raw)
    flipped[info.header_offset + 100 + info.file_size // 2] ^= 0x01
    files["corrupt"].write_bytes(bytes(flipped))
    spec_bad = tmp_path / "bad_spec.pt"
    torch.save({"format": FORMAT, "spec": {"unet": {}}, "meta": {}, **_weights(0)}, spec_bad)
    files["bad_spec"] = spec_bad
    return files


def test_bad_files_are_one_line_model_file_errors_and_run_no_code(tmp_path: Path) -> None:
    for kind, path in _bad_files(tmp_path).items():
        with pytest.raises(ModelFileError) as err:
            load_model_file(path)
            pytest.fail(f"{kind} file loaded")
        msg = str(err.value)
        assert str(path) in msg and "\n" not in msg, (kind, msg)
        assert "weights_only" not in msg and "Traceback" not in msg, (kind, msg)
        assert err.value.__cause__ is None, kind  # no chained torch/pickle traceback
        assert err.value.__context__ is None or err.value.__suppress_context__, kind
    assert not (tmp_path / "pwned_torch").exists() and not (tmp_path / "pwned_pickle").exists()


def test_weights_that_do_not_fit_the_spec(tmp_path: Path) -> None:
    p = tmp_path / "m.pt"
    save_model(p, SPEC, _weights(0))
    blob = torch.load(p, weights_only=True)
    blob["spec"]["unet"]["base_channels"] = 32
    torch.save(blob, p)
    with pytest.raises(ModelFileError, match="do not fit"):
        load_model_file(p)
    with pytest.raises(ModelFileError, match="no 'bogus' weights"):
        load_model_file(p, "bogus")  # type: ignore[arg-type]


def test_training_checkpoint_loads_as_a_model_file(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, schedule="linear", mean_type="eps")
    torch.manual_seed(0)
    net = spec.build_net()
    data = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    cfg = TrainConfig(steps=2, batch_size=4, warmup_steps=1, hflip=False, checkpoint_every=2,
                      log_every=1)
    res = train(net, Loss(spec.diffusion(), "hybrid"), UniformSampler(spec.timesteps), data, cfg,
                tmp_path, device="cpu", spec=spec)
    m = load_model_file(tmp_path / "ckpt_00000002.pt")
    assert m.spec == spec and m.meta == {"step": 2}
    x, t = _probe()
    with torch.no_grad():
        assert torch.equal(m.net(x, t), res.ema(x, t))
        assert torch.equal(load_model_file(tmp_path / "ckpt_00000002.pt", "model").net(x, t),
                           res.model(x, t))
    with pytest.raises(ValueError, match="does not describe"):
        train(spec.build_net(), Loss(spec.diffusion(), "hybrid"), UniformSampler(50), data, cfg,
              tmp_path / "other", device="cpu", spec=dataclasses.replace(SPEC, unet=PRESETS[
                  "digits"], var_type="fixed_large", mean_type="eps"))


def test_checkpoint_without_spec_names_the_fix(tmp_path: Path) -> None:
    spec = dataclasses.replace(SPEC, var_type="fixed_large", mean_type="eps",
                               unet=dataclasses.replace(UNET, out_channels=1))
    data = torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8)
    cfg = TrainConfig(steps=1, batch_size=4, hflip=False, log_every=1)
    train(spec.build_net(), Loss(spec.diffusion()), ImportanceSampler(50), data, cfg, tmp_path,
          device="cpu")
    with pytest.raises(ModelFileError, match="without a model spec"):
        load_model_file(tmp_path / "ckpt_00000001.pt")
    (tmp_path / "ckpt_00000001.pt").write_bytes((tmp_path / "ckpt_00000001.pt").read_bytes()[:99])
    with pytest.raises(ModelFileError, match="truncated"):
        load_model_file(tmp_path / "ckpt_00000001.pt")


def test_heads_file_with_a_flipped_bit_is_refused_like_a_model_file(tmp_path: Path) -> None:
    from ddpm_core.headfile import HeadsFileError, load_heads, save_heads
    from ddpm_core.heads import VarianceHead

    path = tmp_path / "m.heads.pt"
    save_heads({"npr": VarianceHead(32, 1)}, path)
    with zipfile.ZipFile(path) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)  # the conv's weight record
    raw = bytearray(path.read_bytes())
    raw[info.header_offset + 100 + info.file_size // 2] ^= 0x01  # torch.load takes it silently
    path.write_bytes(bytes(raw))
    with pytest.raises(HeadsFileError, match=r"m\.heads\.pt: corrupt \(CRC-32 of .* does not "
                                             r"match\); train them again"):
        load_heads(path)
