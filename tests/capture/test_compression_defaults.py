"""compression="auto": codecs chosen per collection, values stored exactly (issue 12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from numcodecs import Blosc
from torch import nn

from tdump._format import StoreReader
from tdump.analyze import Trial
from tdump.capture import AUTO_COMPRESSION, Hook, HookConfig
from tdump.capture._writer import make_compressors
from tdump.errors import ConfigError


def _codec(reader: StoreReader, name: str) -> str:
    comp = reader.array("train", name).compressors
    if not comp:
        return "none"
    cfg = comp[0].to_dict()["configuration"]
    return f"{cfg['cname']}-{cfg['shuffle']}"


def test_auto_is_the_default_and_picks_per_collection(tmp_path: Path) -> None:
    """Activations and their gradients get LZ4 unless it cannot shrink their first record
    (dense values: a conv's output, a gradient no ReLU or max-pool masked); the rest none."""
    assert HookConfig().compression == "auto"
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(8 * 7 * 7, 2),
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss()
    hook = Hook(str(tmp_path / "d.zarr"), include_regex=r".*", save_interval=1)
    hook.register_module(model)
    hook.register_loss(loss_fn)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 0, 1])
    loss_fn(model(x), y).backward()
    acts = {"2.output_0": model[2](model[1](model[0](x))).detach().numpy()}
    hook.close()
    r = StoreReader(str(tmp_path / "d.zarr"))
    lz4 = Blosc(cname="lz4", clevel=5, shuffle=Blosc.NOSHUFFLE)  # the same codec, by hand
    by_coll: dict[str, set[str]] = {}
    for name in r.tensor_names("train"):
        coll = r.tensor_attrs("train", name)["collection"]
        codec = _codec(r, name)
        by_coll.setdefault(coll, set()).add(codec)
        if coll in AUTO_COMPRESSION:
            value = np.ascontiguousarray(r.read("train", name, 0))
            shrunk = value.nbytes >= 1.01 * len(lz4.encode(value))
            assert codec == ("lz4-noshuffle" if shrunk else "none"), name
            if codec == "none":  # stored as they are: not a byte more
                assert r.record_sizes("train", name) == {0: value.nbytes}, name
    # the ReLU's zeros compress, and so do the gradients max-pooling and the ReLU zeroed
    for name in ("2.output_0", "2.output_0.grad", "1.output_0.grad"):
        assert _codec(r, name) == "lz4-noshuffle", name
    # a conv's output, and the gradient the Linear hands back, are dense
    for name in ("0.output_0", "4.output_0.grad", "5.output_0.grad"):
        assert _codec(r, name) == "none", name
    for coll in ("weights", "biases", "gradients", "running_stats", "losses"):
        assert by_coll[coll] == {"none"}, coll
    np.testing.assert_array_equal(np.asarray(r.array("train", "2.output_0")[0]), acts["2.output_0"])
    np.testing.assert_array_equal(
        np.asarray(r.array("train", "0.weight")[0]), model[0].weight.detach().numpy()
    )
    assert set(AUTO_COMPRESSION) == {"activations", "activation_gradients"}


def test_the_codec_is_chosen_once_per_tensor(tmp_path: Path) -> None:
    """Decided at the tensor's first record: later records keep its codec, and read back equal."""
    out = str(tmp_path / "d.zarr")
    model = nn.Sequential(nn.Identity(), nn.ReLU())
    values = []
    with Hook(out, include_regex=r"1\.output", save_interval=1, strict=True) as hook:
        hook.register_module(model)
        for shift in (10.0, 0.0):  # step 0: all positive, no zeros; step 1: half zeros
            values.append(model(torch.randn(64, 64) + shift).numpy())
    r = StoreReader(out)
    assert _codec(r, "1.output_0") == "none"  # step 0's dense floats do not compress
    for i, want in enumerate(values):
        np.testing.assert_array_equal(r.read("train", "1.output_0", i), want)
    assert r.record_sizes("train", "1.output_0") == {0: values[0].nbytes, 1: values[1].nbytes}


@pytest.mark.parametrize(
    ("spec", "cname", "shuffle", "level"),
    [
        ("zstd", "zstd", "shuffle", 1),
        ("lz4", "lz4", "shuffle", 5),
        ("lz4-noshuffle:2", "lz4", "noshuffle", 2),
    ],
)
def test_explicit_codecs_apply_to_every_collection(
    spec: str, cname: str, shuffle: str, level: int
) -> None:
    for coll in ("weights", "activations", None):
        (codec,) = make_compressors(spec, coll)
        cfg = codec.to_dict()["configuration"]
        assert (cfg["cname"], cfg["shuffle"], cfg["clevel"]) == (cname, shuffle, level)


def test_unknown_codec_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown compression 'brotli'") as e:
        HookConfig(compression="brotli")
    assert "or name:level such as 'zstd:3' (levels: zstd 0 to 9, lz4 0 to 9" in str(e.value)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("zstd:99", "the level of zstd must be an integer from 0 to 9, not '99'"),
        ("zstd:abc", "the level of zstd must be an integer from 0 to 9, not 'abc'"),
        ("lz4:-5", "the level of lz4 must be an integer from 0 to 9, not '-5'"),
        ("lz4-noshuffle:10", "the level of lz4-noshuffle must be an integer from 0 to 9"),
        ("zstd-plain:23", "the level of zstd-plain must be an integer from -131072 to 22"),
        ("zstd:", "the level of zstd must be an integer from 0 to 9, not ''"),
        ("none:3", "none takes no level; pass 'none'"),
    ],
)
def test_bad_levels_are_refused_when_the_hook_is_made(
    tmp_path: Path, spec: str, message: str
) -> None:
    """Not at the first write, which would switch capture off and leave a dump of no steps."""
    out = tmp_path / "d.zarr"
    with pytest.raises(ConfigError, match=f"compression {spec!r}") as e:
        Hook(str(out), include_regex="weight", save_interval=1, compression=spec)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize(
    "spec", ["zstd:0", "zstd:9", "lz4:0", "lz4-noshuffle:9", "zstd-plain:22", "zstd-plain:-5"]
)
def test_every_accepted_level_writes(tmp_path: Path, spec: str) -> None:
    """The bounds the check allows are levels the codecs take: written, reread equal."""
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    out = str(tmp_path / "d.zarr")
    weights = []
    with Hook(out, include_regex="weight", save_interval=1, compression=spec, strict=True) as h:
        h.register_module(model)
        for _ in range(2):
            weights.append(model.weight.detach().clone().numpy())
            model(torch.randn(2, 8)).sum().backward()
            with torch.no_grad():
                model.weight -= 0.1 * model.weight.grad
    trial = Trial(out)
    assert trial.steps(mode="train") == [0, 1]
    for step, w in enumerate(weights):
        np.testing.assert_array_equal(trial.tensor("weight").value(step, mode="train"), w)


def test_bfloat16_storage_halves_the_bytes_of_every_collection(tmp_path: Path) -> None:
    """storage_dtype="bfloat16": bf16-rounded values, byte-shuffled LZ4, half the bytes or less."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 64))
    out = str(tmp_path / "bf.zarr")
    hook = Hook(out, include_regex=r".*", save_interval=1, storage_dtype="bfloat16")
    hook.register_module(model)
    model(torch.randn(4, 3, 8, 8)).sum().backward()
    hook.close()
    r = StoreReader(out)
    for name in ("0.weight", "3.weight", "0.weight.grad"):
        assert _codec(r, name) == "lz4-shuffle", name
        sizes = r.record_sizes("train", name)
        stored = sum(sizes.values())
        logical = np.asarray(r.array("train", name)[0]).nbytes
        assert stored <= 0.55 * logical, (name, stored, logical)
    want = model[3].weight.detach().to(torch.bfloat16).float().numpy()  # torch's own rounding
    np.testing.assert_array_equal(np.asarray(r.array("train", "3.weight")[0]), want)
    assert r.tensor_attrs("train", "3.weight")["storage_dtype"] == "bfloat16"


def test_autocast_bfloat16_outputs_get_the_byte_shuffled_codec(tmp_path: Path) -> None:
    """Under CPU autocast a conv's output and its gradient are bfloat16: stored as float32
    whose two low bytes are zero, so "auto" gives them byte-shuffled LZ4 (as for
    storage_dtype="bfloat16"), not the activations' plain LZ4. Values exact; the bytes
    checked against the plain codec on the same array, encoded here by numcodecs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 4))
    out = str(tmp_path / "amp.zarr")
    hook = Hook(out, include_regex=r"0\.output_0|1\.output_0", save_interval=1)
    hook.register_module(model)
    seen: list[torch.Tensor] = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(8, 3, 8, 8))
    y.float().sum().backward()
    hook.close()
    assert seen[0].dtype == torch.bfloat16
    r = StoreReader(out)
    over_plain = {}
    for name in ("0.output_0", "0.output_0.grad"):
        assert r.tensor_attrs("train", name)["source_dtype"] == "bfloat16", name
        assert _codec(r, name) == "lz4-shuffle", name
        stored = np.ascontiguousarray(np.asarray(r.array("train", name)[0]))
        assert (stored.view(np.uint32) & 0xFFFF).max() == 0  # bfloat16 values, exactly
        plain = len(Blosc("lz4", 5, Blosc.NOSHUFFLE).encode(stored))
        over_plain[name] = sum(r.record_sizes("train", name).values()) / plain
    # dense values: the zero bytes were most of what the plain codec could not shrink
    assert over_plain["0.output_0"] < 0.75 and over_plain["0.output_0.grad"] < 0.9, over_plain
    np.testing.assert_array_equal(
        np.asarray(r.array("train", "0.output_0")[0]), seen[0].float().numpy()
    )


def test_unscaled_float16_gradients_get_the_byte_shuffled_codec(tmp_path: Path) -> None:
    """A float16 output gradient divided by a GradScaler's scale is stored as float32 whose
    13 low mantissa bits are zero: "auto" gives it byte-shuffled LZ4, as for bfloat16.
    Bytes checked against the plain codec on the same array, encoded here by numcodecs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 36, 4))
    out = str(tmp_path / "fp16.zarr")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    hook = Hook(out, include_regex=r"1\.output_0", save_interval=1)
    hook.register_module(model).register_scaler(scaler)
    with torch.autocast("cpu", dtype=torch.float16):
        logits = model(torch.randn(8, 3, 8, 8)).float()
    loss = nn.functional.cross_entropy(logits, torch.randint(0, 4, (8,)))
    scaler.scale(loss).backward()
    hook.close()
    r = StoreReader(out)
    name = "1.output_0.grad"  # the ReLU's output: a dense gradient, no mask
    assert r.tensor_attrs("train", name)["source_dtype"] == "float16"
    assert _codec(r, name) == "lz4-shuffle"
    stored = np.ascontiguousarray(np.asarray(r.array("train", name)[0]))
    assert stored.dtype == np.float32 and np.isfinite(stored).all()
    assert (stored.view(np.uint32) & 0x1FFF).max() == 0  # float16 values over a power of two
    plain = len(Blosc("lz4", 5, Blosc.NOSHUFFLE).encode(stored))
    over_plain = sum(r.record_sizes("train", name).values()) / plain
    assert over_plain < 0.8, over_plain  # the dense gradient: 1.05x plain, ~1.6x shuffled
