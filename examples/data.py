"""Real datasets that load offline, as torch tensors.

The machines these examples run on reach package registries only, so loaders that download at
run time (torchvision, torch_geometric's Planetoid, sklearn ``fetch_*``) fail.  Each dataset
here ships inside a package (see ``docs/DATA.md``); the Python ones are in the ``examples``
extra (``pip install -e .[examples]``).  When a dataset is missing, its loader raises
:class:`DatasetMissing` saying how to install it.

=====================  ==========================================  ==================================
loader                 source                                      install
=====================  ==========================================  ==================================
:func:`fashion_mnist`  Fashion-MNIST IDX files                     ``apt-get install -y dataset-fashion-mnist``
:func:`char_corpus`    gensim test corpora (Lee news, enwiki)      ``pip install gensim``
:func:`cora`           Cora parquet files inside graphdatascience  ``pip install --no-deps graphdatascience pyarrow``
:func:`ucr`            tslearn's cached UCR archives (Trace)       ``pip install tslearn``
=====================  ==========================================  ==================================

Every loader reads files by path (no package is imported: importing gensim or
graphdatascience is slow or needs their other dependencies) and runs in about a second.
``python examples/data.py`` prints the shapes of every dataset.
"""
from __future__ import annotations

import bz2
import gzip
import importlib.util
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch

__all__ = [
    "DatasetMissing",
    "fashion_mnist",
    "FASHION_MNIST_CLASSES",
    "char_corpus",
    "CharTokenizer",
    "lm_batches",
    "cora",
    "CORA_CLASSES",
    "ucr",
]


class DatasetMissing(FileNotFoundError):
    """A dataset's files are not installed; the message says how to install them."""


def _package_dir(package: str, install: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetMissing(f"package {package!r} is not installed; install it with: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _require(path: Path, what: str, install: str) -> Path:
    if not path.exists():
        raise DatasetMissing(f"{what} not found at {path}; install it with: {install}")
    return path


# --------------------------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Mean and standard deviation of the training pixels (scaled to [0, 1]).
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def fashion_mnist(split: str = "train", limit: Optional[int] = None,
                  root: Path | str = FASHION_MNIST_DIR) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST from the Debian package's IDX files.

    Returns ``(images, labels)``: ``images`` float32 ``[N, 1, 28, 28]`` normalized with the
    training set's mean and std (``(x / 255 - 0.2860) / 0.3530``), ``labels`` int64 ``[N]`` in
    0..9 (names in :data:`FASHION_MNIST_CLASSES`).  ``split`` is ``"train"`` (60000 images) or
    ``"test"`` (10000); ``limit`` keeps the first ``limit`` examples.
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    img_file = _require(root / f"{prefix}-images-idx3-ubyte.gz", "Fashion-MNIST", FASHION_MNIST_INSTALL)
    lbl_file = _require(root / f"{prefix}-labels-idx1-ubyte.gz", "Fashion-MNIST", FASHION_MNIST_INSTALL)
    with gzip.open(img_file) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(lbl_file) as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32))
    x = (x / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return x, torch.from_numpy(labels.astype(np.int64))


# --------------------------------------------------------------------------------------------
# Character-level text
# --------------------------------------------------------------------------------------------

GENSIM_INSTALL = "pip install gensim"
CHAR_CORPORA = {
    # English news articles, one per line: 360k characters.
    "lee": "lee_background.cor",
    # A shortened Wikipedia XML dump (raw wiki markup inside XML): about 6M characters.
    "enwiki": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
}


def char_corpus(name: str = "lee", limit_chars: Optional[int] = None) -> str:
    """Text of one of gensim's test corpora (``"lee"`` or ``"enwiki"``), as a str.

    ``limit_chars`` keeps the first ``limit_chars`` characters (and, for the compressed
    enwiki dump, decompresses only that much).  The enwiki text is the raw XML dump.
    """
    if name not in CHAR_CORPORA:
        raise ValueError(f"name must be one of {sorted(CHAR_CORPORA)}, got {name!r}")
    data_dir = _package_dir("gensim", GENSIM_INSTALL) / "test" / "test_data"
    path = _require(data_dir / CHAR_CORPORA[name], f"gensim corpus {name!r}", GENSIM_INSTALL)
    opener = bz2.open if path.suffix == ".bz2" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return f.read() if limit_chars is None else f.read(limit_chars)


class CharTokenizer:
    """Character vocabulary built from a text: ids are the sorted distinct characters."""

    def __init__(self, text: str):
        self.chars = sorted(set(text))
        self.index = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        """int64 ids ``[len(text)]``; a character outside the vocabulary raises ``KeyError``."""
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.int64)
        except KeyError as e:
            raise KeyError(f"character {e.args[0]!r} is not in the tokenizer's vocabulary") from None

    def decode(self, ids) -> str:
        """Text of a sequence of ids (tensor or list)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)


def lm_batches(ids: torch.Tensor, seq_len: int, batch_size: int,
               generator: Optional[torch.Generator] = None,
               num_batches: Optional[int] = None) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Random windows of a 1-D id tensor for next-token prediction.

    Yields ``(inputs, targets)``, both int64 ``[batch_size, seq_len]``, with
    ``targets[:, t] == inputs[:, t + 1]`` in the text: each row starts at a uniformly random
    offset drawn from ``generator`` (pass a seeded ``torch.Generator`` for reproducible batches).
    Yields ``num_batches`` batches, or forever when it is ``None``.
    """
    ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
    n_starts = ids.numel() - seq_len
    if n_starts < 1:
        raise ValueError(f"need more than seq_len={seq_len} ids, got {ids.numel()}")
    offsets = torch.arange(seq_len + 1)
    produced = 0
    while num_batches is None or produced < num_batches:
        starts = torch.randint(0, n_starts, (batch_size, 1), generator=generator)
        window = ids[starts + offsets]                 # [batch, seq_len + 1]
        yield window[:, :-1], window[:, 1:]
        produced += 1


# --------------------------------------------------------------------------------------------
# Cora citation graph
# --------------------------------------------------------------------------------------------

CORA_INSTALL = "pip install --no-deps graphdatascience pyarrow"
# Subject ids as serialized by graphdatascience (resources/cora/serialize_cora.py).
CORA_CLASSES = ("Neural_Networks", "Rule_Learning", "Reinforcement_Learning",
                "Probabilistic_Methods", "Theory", "Genetic_Algorithms", "Case_Based")


def cora(seed: int = 0, train_per_class: int = 20, num_val: int = 500, num_test: int = 1000) -> dict:
    """The Cora citation graph from graphdatascience's parquet files (read with pyarrow).

    Returns a dict with

    * ``x``: float32 ``[2708, 1433]`` binary bag-of-words features (not normalized);
    * ``edge_index``: int64 ``[2, 10556]``, every citation in both directions, without
      duplicates or self loops (5278 undirected edges), nodes numbered in file order;
    * ``y``: int64 ``[2708]`` subject in 0..6 (names in :data:`CORA_CLASSES`);
    * ``num_classes``: 7;
    * ``train_mask``, ``val_mask``, ``test_mask``: bool ``[2708]``, disjoint.

    The split is the common semi-supervised one in size (Kipf & Welling): ``train_per_class``
    (20) random nodes of each class for training, then ``num_val`` (500) and ``num_test``
    (1000) random nodes among the rest.  The nodes are chosen with ``torch.Generator``
    seeded by ``seed`` (default 0), so the split is fixed for a given seed; it is not
    Planetoid's exact node list, whose ids these files do not carry.
    """
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DatasetMissing(f"Cora needs pyarrow; install it with: {CORA_INSTALL}") from None
    cora_dir = _package_dir("graphdatascience", CORA_INSTALL) / "resources" / "cora"
    nodes = pq.read_table(_require(cora_dir / "cora_nodes.parquet.gzip", "Cora nodes", CORA_INSTALL),
                          columns=["nodeId", "subject", "features"])
    rels = pq.read_table(_require(cora_dir / "cora_rels.parquet.gzip", "Cora edges", CORA_INSTALL),
                         columns=["sourceNodeId", "targetNodeId"])

    node_ids = nodes.column("nodeId").to_numpy()
    feats = nodes.column("features").combine_chunks()
    x = feats.values.to_numpy().reshape(len(node_ids), -1).astype(np.float32)
    y = nodes.column("subject").to_numpy().astype(np.int64)

    # Paper ids -> row numbers.
    order = np.argsort(node_ids)
    def rows(paper_ids):
        return order[np.searchsorted(node_ids, paper_ids, sorter=order)]
    src = rows(rels.column("sourceNodeId").to_numpy())
    dst = rows(rels.column("targetNodeId").to_numpy())
    edges = np.concatenate([np.stack([src, dst]), np.stack([dst, src])], axis=1)
    edges = edges[:, edges[0] != edges[1]]
    edges = np.unique(edges, axis=1)                    # sorted by source, then target

    n = len(node_ids)
    num_classes = int(y.max()) + 1
    g = torch.Generator().manual_seed(seed)
    y_t = torch.from_numpy(y)
    train = torch.zeros(n, dtype=torch.bool)
    for c in range(num_classes):
        members = (y_t == c).nonzero().flatten()
        train[members[torch.randperm(len(members), generator=g)[:train_per_class]]] = True
    rest = (~train).nonzero().flatten()
    rest = rest[torch.randperm(len(rest), generator=g)]
    val = torch.zeros(n, dtype=torch.bool)
    test = torch.zeros(n, dtype=torch.bool)
    val[rest[:num_val]] = True
    test[rest[num_val:num_val + num_test]] = True

    return {
        "x": torch.from_numpy(x),
        "edge_index": torch.from_numpy(edges.astype(np.int64)),
        "y": y_t,
        "num_classes": num_classes,
        "train_mask": train,
        "val_mask": val,
        "test_mask": test,
    }


# --------------------------------------------------------------------------------------------
# UCR time series
# --------------------------------------------------------------------------------------------

TSLEARN_INSTALL = "pip install tslearn"


def ucr(name: str = "Trace") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A UCR time-series data set from tslearn's cache (``tslearn/.cached_datasets/<name>.npz``).

    Returns ``(x_train, y_train, x_test, y_test)``: ``x`` float32 ``[N, T, C]`` (Trace:
    100 + 100 series, T=275, C=1), ``y`` int64 relabelled to 0..num_classes-1 (the file's
    labels are 1..4 for Trace) in sorted order of the original labels.  Only the data sets
    that ship in tslearn's wheel are available offline (``Trace``).
    """
    cache = _package_dir("tslearn", TSLEARN_INSTALL) / ".cached_datasets"
    path = cache / f"{name}.npz"
    if not path.exists():
        available = sorted(p.stem for p in cache.glob("*.npz")) if cache.exists() else []
        raise DatasetMissing(f"UCR data set {name!r} not found at {path} (cached: {available}); "
                             f"install tslearn with: {TSLEARN_INSTALL}")
    with np.load(path) as d:
        x_train, y_train, x_test, y_test = d["X_train"], d["y_train"], d["X_test"], d["y_test"]
    classes = np.unique(np.concatenate([y_train, y_test]))
    def relabel(y):
        return torch.from_numpy(np.searchsorted(classes, y).astype(np.int64))
    def series(x):
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return series(x_train), relabel(y_train), series(x_test), relabel(y_test)


if __name__ == "__main__":
    import time

    def shapes(obj):
        if isinstance(obj, torch.Tensor):
            return f"{tuple(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
        if isinstance(obj, str):
            return f"str, {len(obj):,} chars"
        return repr(obj)

    def show(title, fn):
        t0 = time.perf_counter()
        try:
            out = fn()
        except DatasetMissing as e:
            print(f"{title}: MISSING - {e}")
            return
        dt = time.perf_counter() - t0
        items = out.items() if isinstance(out, dict) else enumerate(out if isinstance(out, tuple) else (out,))
        print(f"{title} ({dt:.2f} s)")
        for k, v in items:
            print(f"    {k}: {shapes(v)}")

    show("fashion_mnist('train')", lambda: fashion_mnist("train"))
    show("fashion_mnist('test')", lambda: fashion_mnist("test"))
    for corpus in CHAR_CORPORA:
        show(f"char_corpus({corpus!r})", lambda: char_corpus(corpus))
    text = char_corpus("lee")
    tok = CharTokenizer(text)
    ids = tok.encode(text)
    assert tok.decode(ids[:200]) == text[:200]
    inp, tgt = next(lm_batches(ids, seq_len=64, batch_size=8, generator=torch.Generator().manual_seed(0)))
    print(f"CharTokenizer(lee): vocab {tok.vocab_size}; lm_batches -> {shapes(inp)}, {shapes(tgt)}")
    show("cora()", cora)
    show("ucr('Trace')", lambda: ucr("Trace"))
