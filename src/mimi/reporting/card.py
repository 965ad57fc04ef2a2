"""Model cards: a task's ``README.md`` in the Hugging Face Hub's form (YAML front matter, then Markdown).

The front matter carries what the Hub indexes (``library_name``, ``base_model``, ``tags``, ``datasets``,
``metrics`` and a ``model-index`` entry with the run's test accuracy, ``license`` where the data source records
one); the body says how the task was trained (method, budget), what it costs (parameters, bytes, the per-layer size
map) and how to load it with mimi and, for LoRA, with PEFT. Only facts the run recorded are written.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mimi.core.modules import TRANSFORMERS_PREFIX, is_transformers

# Licence identifiers the Hub knows, as a data source may spell them (``CC-BY-NC-SA-4.0 (non-commercial...)``).
HUB_LICENSES = {
    "mit",
    "apache-2.0",
    "bsd-3-clause",
    "cc0-1.0",
    "cc-by-4.0",
    "cc-by-sa-4.0",
    "cc-by-nc-4.0",
    "cc-by-nc-sa-4.0",
    "cc-by-nd-4.0",
    "cc-by-nc-nd-4.0",
}


@dataclass
class CardFacts:
    """What a card says about one task.

    Attributes:
        name: the task's name (the file or folder stem).
        method: training method (``mimi``, ``mimi-lora``, ``lora``, ...); ``method_help`` its one-line description.
        model: timm model name of the backbone; ``weights`` where its weights came from; ``img_size`` in pixels.
        data: the dataset (``vtab1k:elpv_defect``); ``license`` its licence where the data source records one.
        num_classes: size of the head; ``classes`` the class names, where known.
        test_accuracy / val_accuracy: of the run's final model (fractions), where measured.
        budget: the run's adapter-parameter budget; ``budget_flag`` how it was given (``--budget-dim 3``).
        adapter_params / head_params: trained parameters outside / inside the head.
        files: every file written, with its bytes (``{"adapter_model.safetensors": 123456}``); ``dtype`` of the
            stored tensors.
        sizes: per layer or adapter, its rank or hidden size (removed ones absent); ``size_unit`` names it.
        removed: adapters or LoRA layers pruned away entirely.
        peft: the card sits in a PEFT LoRA folder (loading with PEFT is shown).
        load_path: what to pass to mimi (``task.safetensors`` or the folder).
    """

    name: str
    method: str
    model: str
    data: str
    num_classes: int
    adapter_params: int
    head_params: int
    files: dict[str, int]
    sizes: dict[str, int]
    load_path: str
    method_help: str = ""
    weights: str | None = None
    img_size: int | None = None
    license: str | None = None
    classes: list[str] | None = None
    test_accuracy: float | None = None
    val_accuracy: float | None = None
    budget: int | None = None
    budget_flag: str | None = None
    dtype: str = "float32"
    size_unit: str = "hidden size"
    removed: list[str] = field(default_factory=list)
    peft: bool = False


def hub_license(recorded: str | None) -> str | None:
    """The Hub identifier of a recorded licence (its first word, lower-cased) or ``other``; None when none."""
    if not recorded:
        return None
    m = re.match(r"\s*([A-Za-z0-9.+-]+)", recorded)
    ident = m.group(1).lower() if m else ""
    return ident if ident in HUB_LICENSES else "other"


def base_model(model: str) -> str:
    """The backbone as a Hub id: timm's models live under ``timm/``; a ``transformers:`` model is its Hub id (or
    folder) itself."""
    if is_transformers(model):
        return model.removeprefix(TRANSFORMERS_PREFIX)
    return model if "/" in model else f"timm/{model}"


def front_matter(f: CardFacts) -> dict:
    meta: dict = {"library_name": "peft" if f.peft else "mimi", "base_model": base_model(f.model)}
    tags = ["mimi", "image-classification", "timm", "vision-transformer", f.method]
    if f.peft or f.size_unit == "rank":
        tags += ["lora"] + (["peft"] if f.peft else [])
    meta["tags"] = list(dict.fromkeys(tags))
    meta["datasets"] = [f.data]
    lic = hub_license(f.license)
    if lic:
        meta["license"] = lic
        if lic == "other":
            meta["license_name"] = f.license
    meta["pipeline_tag"] = "image-classification"
    if f.test_accuracy is not None:
        meta["metrics"] = ["accuracy"]
        meta["model-index"] = [
            {
                "name": f.name,
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": f.data, "type": f.data, "split": "test"},
                        "metrics": [{"type": "accuracy", "value": round(f.test_accuracy, 6), "name": "test accuracy"}],
                    }
                ],
            }
        ]
    return meta


def size_map(sizes: dict[str, int], unit: str) -> list[str]:
    """A Markdown table: one row per block, one column per site (``attn.qkv``, ``ls1``...), ``-`` where removed."""
    rows: dict[str, dict[str, int]] = {}
    for name, k in sizes.items():
        name = name.removesuffix(".adapter")
        m = re.match(r"(.*?)\.?((?:attn|mlp|ls1|ls2)(?:\..+)?)$", name)
        block, site = (m.group(1) or "(model)", m.group(2)) if m else (name, "")
        rows.setdefault(block, {})[site] = k
    cols = list(dict.fromkeys(s for r in rows.values() for s in r))
    lines = [f"| block | {' | '.join(cols)} |", "|---|" + "---:|" * len(cols)]
    for block, r in rows.items():
        lines.append(f"| {block} | " + " | ".join(str(r[c]) if c in r else "-" for c in cols) + " |")
    return [f"Per-layer {unit} (`-`: removed):", "", *lines]


def render_card(f: CardFacts) -> str:
    """The card's full text."""
    out = ["---", yaml.safe_dump(front_matter(f), sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    out += [f"# {f.name}: {f.method} on {f.data}", ""]
    trained = f"Trained with mimi's `{f.method}`" + (f" ({f.method_help})" if f.method_help else "")
    weights = f" with weights `{f.weights}`" if f.weights else ""
    px = f" at {f.img_size} px" if f.img_size else ""
    out += [f"{trained} on the frozen backbone `{f.model}`{weights}{px}, {f.num_classes} classes.", ""]
    facts = []
    if f.budget is not None:
        facts.append(f"- budget: {f.budget:,} adapter parameters" + (f" (`{f.budget_flag}`)" if f.budget_flag else ""))
    if f.test_accuracy is not None:
        val = f", validation {100 * f.val_accuracy:.2f}%" if f.val_accuracy is not None else ""
        facts.append(f"- test accuracy: {100 * f.test_accuracy:.2f}%{val}")
    facts.append(f"- parameters: {f.adapter_params:,} in the adapters / LoRA, {f.head_params:,} in the head")
    for name, n in f.files.items():  # the dtype is that of the tensors: said of the tensor file only
        facts.append(f"- `{name}`: {n:,} bytes" + (f" ({f.dtype})" if name.endswith(".safetensors") else ""))
    if f.removed:
        facts.append(
            f"- removed entirely: {len(f.removed)} ({', '.join(f.removed[:6])}{'...' if len(f.removed) > 6 else ''})"
        )
    if f.license:
        facts.append(f"- data licence: {f.license}")
    if f.classes:
        shown = ", ".join(f.classes[:20]) + (", ..." if len(f.classes) > 20 else "")
        facts.append(f"- classes: {shown}")
    out += facts + [""]
    if f.sizes:
        out += size_map(f.sizes, f.size_unit) + [""]
    out += ["## Load it with mimi", "", "```python", "import mimi", ""]
    out += [
        f'bank = mimi.AdapterBank("{f.model}"'
        + (f', weights="{f.weights}"' if f.weights else "")
        + (f", img_size={f.img_size}" if f.img_size else "")
        + ")",
        f'bank.add("{f.name}", "{f.load_path}")',
        f'bank.predict(["image.png"], "{f.name}")',
        "```",
        "",
        f"or `mimi predict --task {f.name}={f.load_path} --images DIR --out predictions.csv`.",
        "",
    ]
    if f.peft:
        out += [
            "## Load it with PEFT",
            "",
            "```python",
            "import timm",
            "from peft import PeftModel",
            "",
            f'model = timm.create_model("{f.model}", num_classes={f.num_classes}'
            + (f", img_size={f.img_size}" if f.img_size else "")
            + ")  # holding the backbone weights named above",
            f'model = PeftModel.from_pretrained(model, "{f.load_path}").eval()',
            "```",
            "",
        ]
    return "\n".join(out)


def facts_from_run(
    run_dir: str | Path,
    *,
    name: str,
    files: dict[str, int],
    sizes: dict[str, int],
    adapter_params: int,
    head_params: int,
    load_path: str,
    dtype: str,
    peft: bool = False,
    classes: list[str] | None = None,
    license: str | None = None,
) -> CardFacts:
    """A card's facts from a run folder (``run.json``, ``summary.json``, ``config.yaml``) and what was exported."""
    from mimi.methods import method_class, method_traits

    run_dir = Path(run_dir)
    info = _read_json(run_dir / "run.json", {})
    summary = _read_json(run_dir / "summary.json", [])
    final = summary[-1] if isinstance(summary, list) and summary else {}
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    method = str(info.get("method") or cfg.get("method") or "?")
    traits = method_traits(method)
    try:
        method_help = method_class(method).description
    except Exception:  # noqa: BLE001 (a method no longer installed: the card still names it)
        method_help = ""
    budget_flag = None
    if cfg.get("budget_dim") is not None:
        budget_flag = f"--budget-dim {cfg['budget_dim']}"
    elif cfg.get("budget_params") is not None:
        budget_flag = f"--budget-params {cfg['budget_params']}"
    at_insertion = [e["name"] for e in info.get("layout", []) if isinstance(e, dict) and "name" in e]
    removed = [
        n.removesuffix(".adapter") for n in at_insertion if n not in sizes and n.removesuffix(".adapter") not in sizes
    ]
    return CardFacts(
        name=name,
        method=method,
        method_help=method_help,
        model=str(info.get("model") or cfg.get("model") or "?"),
        weights=info.get("weights_source") or None,
        img_size=info.get("img_size"),
        data=str(info.get("data") or cfg.get("data") or "?"),
        license=license,
        num_classes=int(info.get("num_classes") or 0),
        classes=classes,
        test_accuracy=final.get("test_acc"),
        val_accuracy=final.get("val_acc"),
        budget=info.get("budget"),
        budget_flag=budget_flag,
        adapter_params=adapter_params,
        head_params=head_params,
        files=files,
        dtype=dtype,
        sizes=sizes,
        size_unit=traits.size_unit if traits else "hidden size",
        removed=removed,
        peft=peft,
        load_path=load_path,
    )


def _read_json(path: Path, default):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def is_mimi_card(path: str | Path) -> bool:
    """Whether ``path`` is a model card mimi wrote (so that exporting again may replace it)."""
    try:
        head = Path(path).read_text(errors="replace")[:4000]
    except OSError:
        return False
    return head.startswith("---\n") and "\n- mimi\n" in head
