"""DomainNet with its official split files.

::

    <root>/<domain>_train.txt   <domain>_test.txt      lines "<domain>/<class>/<file>.jpg <label>"
    <root>/<domain>/<class>/<file>.jpg

DomainNet has no validation split: a stratified, seeded share of train becomes val.
"""

from __future__ import annotations

from pathlib import Path

from mimi.core.errors import DataError
from mimi.data.base import (
    FileSource,
    LoadOptions,
    TaskData,
    carve_val,
    check_files,
    read_list_file,
    register_dataset,
    require_root,
    task_from_sources,
)

DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
#: Every domain shares one label space, so a head trained on one domain can be evaluated on another.
NUM_CLASSES = 345

_HINT = "pointing at the folder that holds <domain>_train.txt, <domain>_test.txt and the domain folders"


def _class_names(source: FileSource) -> list[str] | None:
    """Names from the ``<domain>/<class>/<file>`` paths, when the split shows all 345 classes."""
    names: dict[int, str] = {}
    for path, y in zip(source.paths, source.labels):
        names.setdefault(y, path.parent.name)
    return [names[y] for y in range(NUM_CLASSES)] if len(names) == NUM_CLASSES else None


@register_dataset(
    "domainnet",
    "DomainNet domain: clipart infograph painting quickdraw real sketch (--data-root holds the split files)",
    usage="domainnet:DOMAIN",
)
def build_domainnet(domain: str, *, root: Path | None, trainval: bool, opts: LoadOptions) -> TaskData:
    """Load one DomainNet domain: val is a stratified ``val_fraction`` of the official train list."""
    domain = domain.strip().lower()
    if not domain:
        raise DataError(f"domainnet: no domain given; write domainnet:DOMAIN with DOMAIN one of {', '.join(DOMAINS)}")
    name = f"domainnet:{domain}"
    root = require_root(name, root, _HINT)
    if not (root / f"{domain}_train.txt").is_file() and domain not in DOMAINS:
        raise DataError(f"{name}: unknown domain (no {root / f'{domain}_train.txt'}); domains: {', '.join(DOMAINS)}")
    full_train = read_list_file(root / f"{domain}_train.txt", root, name)
    test = read_list_file(root / f"{domain}_test.txt", root, name)
    for split in (full_train, test):
        check_files(split, name)
        if max(split.labels, default=0) >= NUM_CLASSES:
            raise DataError(f"{name}: label {max(split.labels)} outside DomainNet's 0..{NUM_CLASSES - 1}")
    train, val = carve_val(full_train, opts, trainval)
    cache_dir = root / ".cache"
    return task_from_sources(
        name,
        (train, val, test),
        opts,
        num_classes=NUM_CLASSES,
        classes=_class_names(full_train),
        cache_dir=cache_dir,
        fixed_classes=True,  # DomainNet's 345 classes, whatever a split file holds
    )
