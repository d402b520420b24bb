"""`Head`: the one base class every head subclasses.

A head turns the backbone's outputs into a task's predictions. `RecsysLM` (models/module.py)
calls the hooks below, in this order, and nothing else; each has a no-op default, so a head
overrides only what it needs:

    __init__(hidden_size, **head.net)   built from conf/head/<name>.yaml (`net`)
    bind(backbone)                      once, after PEFT and freezing: check the backbone fits
    attach(data)                        once the data is prepared: size per-item / per-class
                                        tensors, read the item prior, the target space
    on_fit_start(backbone, items)       before the first training step (e.g. cache item vectors)
    loss(backbone, batch)               every training step            (required)
    on_eval_start(backbone, items)      before each validation / test epoch (e.g. embed the
                                        catalogue once)
    evaluate(backbone, batch, metrics)  every evaluation batch: feed the task's metric set
                                        (required)

Inference, what serving calls (after `attach`, in eval mode):

    score(backbone, history, candidates)   every head: one score per candidate item
    recommend(backbone, history, k, exclude)  ranking heads: the top-k items of the catalogue

Ranking heads whose score is a dot product (`ranks_by_vectors`: two-tower, sequential) also
give serving's item index its vectors, so new items join from their text alone:

    item_vectors(backbone, items)             one vector per item (new ones: from text)
    query_vectors(backbone, histories, table) one query per user; score = query . item vector

A head with a user-side network of its own over item vectors (the sequential head's causal
encoder) hands it out for the ONNX flavours to compile, and runs the compiled one once given:

    query_network()                  (vectors [B, T, d], mask [B, T]) -> queries [B, d], or None
    use_query_network(network)       run the user side (serving and evaluation) with `network`

State is persisted one way: the module's `state_dict` (parameters, persistent buffers and, for
values that are not tensors, `get_extra_state`). Tensors whose size comes from the data (one
row per item, one output per class) are named in `data_sized`: `attach` sizes them, and
loading a checkpoint or an export resizes them to the saved shapes before the weights are
copied, so `load_state_dict` works on a freshly built head without the data.

`task` names the head's record in recsys_lm.data.tasks (datasets, metrics, eval modes,
monitored metric, baselines). A head for an existing task is this subclass plus one YAML in
conf/head/; a head for a new task adds one `Task` record.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn

from recsys_lm.data.batches import ItemBatch, PairBatch
from recsys_lm.data.datasets.examples import ItemSet, pair_batch

PAIRS_PER_PASS = 256  # (history, candidate) sequences per forward pass in PairHead.score

if TYPE_CHECKING:
    from recsys_lm.data.prepared import PreparedData
    from recsys_lm.data.text import TokenCache
    from recsys_lm.models.backbone import Backbone


@dataclass
class Recommendation:
    """Top-k items for one user, best first: item indices and their scores."""

    items: list[int]
    scores: list[float]


@dataclass
class Catalogue:
    """What inference needs to turn item indices into model inputs: the items' token ids and
    the history budget (from the prepared data; `Head.attach` keeps it)."""

    tokens: TokenCache
    num_items: int
    history_budget: int  # data.max_history_tokens
    max_sequence_length: int  # data.max_sequence_length

    def item_batches(self, size: int = 256) -> Iterator[ItemBatch]:
        """Every item's text, in catalogue order, `size` items a batch."""
        items = ItemSet(self.num_items, self.tokens)
        for start in range(0, self.num_items, size):
            yield items.collate(list(range(start, min(start + size, self.num_items))))


class Head(nn.Module):
    task: ClassVar[str]  # the Task record this head is trained and evaluated as
    # Dotted names of parameters/buffers whose shape depends on the data (see the docstring).
    data_sized: ClassVar[tuple[str, ...]] = ()

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.catalogue: Catalogue | None = None  # set by attach; not state
        self.register_load_state_dict_pre_hook(_resize_to_saved)

    # -- lifecycle hooks (no-op defaults) ------------------------------------------------
    def bind(self, backbone: Backbone) -> None:
        """Check that the (wrapped, frozen) backbone fits this head; raise ConfigError if not."""

    def attach(self, data: PreparedData) -> None:
        """Take what the head needs from the prepared data. Subclasses call super()."""
        settings = data.settings
        self.catalogue = Catalogue(
            data.tokens, data.num_items, settings.max_history_tokens, settings.max_sequence_length
        )

    def on_fit_start(self, backbone: Backbone, items: Iterable[ItemBatch]) -> None:
        """Before the first training step; `items` yields the catalogue's texts in order."""

    def on_eval_start(self, backbone: Backbone, items: Iterable[ItemBatch]) -> None:
        """Before each evaluation epoch (and before inference); `items` as above."""

    def loss(self, backbone: Backbone, batch: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.loss")

    def evaluate(self, backbone: Backbone, batch: Any, metrics: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__}.evaluate")

    # -- inference -----------------------------------------------------------------------
    def score(
        self, backbone: Backbone, history: Sequence[int], candidates: Sequence[int]
    ) -> torch.Tensor:
        """One score per candidate item for a user who interacted with `history` (item
        indices, oldest first): higher is better (click probability, rating, similarity...)."""
        raise NotImplementedError(f"{type(self).__name__}.score")

    @torch.no_grad()
    def recommend(
        self,
        backbone: Backbone,
        history: Sequence[int],
        k: int = 10,
        exclude: Iterable[int] = (),
    ) -> Recommendation:
        """The `k` best items of the catalogue, never one of `history` or `exclude`. The
        default scores every item through `score`; heads with a faster path override it."""
        scores = self.score(backbone, history, range(self.require_catalogue().num_items))
        return top_k(scores, k, [*history, *exclude])

    # -- serving: dot-product ranking over an item index ---------------------------------
    ranks_by_vectors: ClassVar[bool] = False

    def item_vectors(self, backbone: Backbone, items: ItemBatch) -> torch.Tensor:
        """Vectors [B, d] of these items (`items.item_index`; an index at or beyond the
        trained catalogue is an item added after training, known by its text only)."""
        raise NotImplementedError(f"{type(self).__name__} does not rank by item vectors")

    def query_vectors(
        self, backbone: Backbone, histories: Sequence[Sequence[int]], table: torch.Tensor
    ) -> torch.Tensor:
        """Query vectors [B, d], one per history (item indices, oldest first); `table`
        [n, d] holds `item_vectors` of every served item, added items included. A user's
        score for item i is `query . table[i]`, the same as `score` gives."""
        raise NotImplementedError(f"{type(self).__name__} does not rank by item vectors")

    # -- serving: a compiled user-side network --------------------------------------------
    def query_network(self) -> nn.Module | None:
        """The head's own user-side network, `(vectors [B, T, d] float, mask [B, T] bool,
        True at real items, left-padded) -> queries [B, d]`, with d as its `dim`, for the
        ONNX flavours to
        compile; None (the default) where the user side is the backbone alone, which the
        flavours compile anyway."""
        return None

    def use_query_network(self, network: Any) -> None:
        """Run the user side (query_vectors and evaluation) through `network`, a callable
        with `query_network`'s signature (an onnxruntime graph of it); None = the head's own
        modules. Only heads that give a `query_network` take one."""
        raise NotImplementedError(f"{type(self).__name__} has no query network of its own")

    def require_catalogue(self) -> Catalogue:
        if self.catalogue is None:
            raise RuntimeError(
                f"{type(self).__name__}: attach(data) first (recsys_lm.build.load_run does)"
            )
        return self.catalogue

    # -- data-sized tensors ----------------------------------------------------------------
    def resize(self, name: str, shape: Sequence[int], init=None) -> torch.Tensor:
        """Give the data-sized parameter or buffer `name` a new shape (values from `init`, an
        in-place initialiser, else zeros); a no-op when it already has that shape."""
        owner, leaf, tensor = self._locate(name)
        if tuple(tensor.shape) == tuple(shape):
            return tensor
        fresh = torch.zeros(tuple(shape), dtype=tensor.dtype, device=tensor.device)
        if init is not None:
            init(fresh)
        if isinstance(tensor, nn.Parameter):
            tensor.data = fresh  # the same Parameter object: optimizers and hooks keep it
            return tensor
        owner._buffers[leaf] = fresh
        return fresh

    def _locate(self, name: str) -> tuple[nn.Module, str, torch.Tensor]:
        path, _, leaf = name.rpartition(".")
        owner = self.get_submodule(path) if path else self
        tensor = owner._parameters.get(leaf)
        if tensor is None:
            tensor = owner._buffers.get(leaf)
        if tensor is None:
            raise AttributeError(f"{type(self).__name__}.data_sized names {name!r}: no such tensor")
        return owner, leaf, tensor


def _resize_to_saved(head: Head, state_dict: dict, prefix: str, *args) -> None:
    """Load-time hook: data-sized tensors take the saved shapes before weights are copied."""
    for name in head.data_sized:
        saved = state_dict.get(prefix + name)
        if saved is not None:
            head.resize(name, saved.shape)


def top_k(scores: torch.Tensor, k: int, exclude: Iterable[int]) -> Recommendation:
    """The k highest of `scores` [n_items], leaving out the `exclude` indices."""
    scores = scores.float().clone()
    banned = torch.as_tensor(sorted(set(exclude)), dtype=torch.long, device=scores.device)
    scores[banned] = float("-inf")
    top = scores.topk(min(k, int(torch.isfinite(scores).sum())))
    return Recommendation(top.indices.tolist(), top.values.tolist())


class PairHead(Head):
    """A cross-encoder head: it reads "history [SEP] candidate" as one sequence (click,
    rating, behaviour, TALLRec). `forward(backbone, PairBatch)` gives the per-row prediction;
    `score` builds those pairs for inference."""

    def forward(self, backbone: Backbone, batch: PairBatch) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__}.forward")

    @torch.no_grad()
    def score(
        self, backbone: Backbone, history: Sequence[int], candidates: Sequence[int]
    ) -> torch.Tensor:
        catalogue = self.require_catalogue()
        rows = [(0, list(history), int(item), 0.0) for item in candidates]
        out = []
        for start in range(0, len(rows), PAIRS_PER_PASS):  # a whole catalogue is many pairs
            chunk = rows[start : start + PAIRS_PER_PASS]
            batch = pair_batch(chunk, catalogue.tokens, catalogue.history_budget, torch.float32)
            out.append(self(backbone, move_data_to_device(batch, backbone.device)))
        return torch.cat(out)
