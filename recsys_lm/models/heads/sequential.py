"""Sequential recommendation head: a small causal transformer (SASRec, Kang & McAuley 2018)
over the user's item sequence, where each item is its language-model text embedding
(optionally plus a learned ID embedding).

Item embeddings come from the backbone's pooled item text in one of two ways:
- `cached`: computed once (no gradient) when training starts and kept as a buffer; the
  backbone stays frozen, every step is cheap, and serving needs only the small network and
  the table (the real-time path). Use with `freeze=head_only`.
- `trained`: each step embeds the batch's distinct items through the backbone with gradients,
  so LoRA / full fine-tuning adapt the text encoder to the task.

With `text: false` and `id_embedding: true` it is the ID-only SASRec baseline.

Training is next-item prediction at every position with a softmax over items: the full
catalogue (`negatives: 0`) or the positive plus `negatives` uniformly drawn items (sampled
softmax) where the table is at hand (`cached`, ID-only), and the batch's distinct items
(in-batch softmax) when the backbone embeds them (`trained`). Evaluation ranks the whole
catalogue from the last position.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from recsys_lm.data.batches import ItemBatch, SequenceBatch
from recsys_lm.data.datasets.sequences import IGNORE
from recsys_lm.data.prepared import PreparedData
from recsys_lm.errors import ConfigError
from recsys_lm.metrics import RankingMetrics
from recsys_lm.models.backbone import Backbone
from recsys_lm.models.heads.base import Head, top_k

ITEM_EMBEDDINGS = ("cached", "trained")


class CausalEncoder(nn.Module):
    """SASRec's self-attention stack: recency position embeddings, causal attention, pre-norm
    blocks. Inputs are left-padded; padding is never attended to."""

    def __init__(
        self, dim: int, max_len: int, num_layers: int, num_heads: int, dropout: float
    ) -> None:
        super().__init__()
        self.dim, self.max_len, self.num_heads = dim, max_len, num_heads
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, num_heads, dim * 4, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, d] item vectors, mask [B, T] True at real items -> states [B, T, d]."""
        width = x.shape[1]
        recency = torch.arange(width - 1, -1, -1, device=x.device).clamp(max=self.max_len - 1)
        x = self.dropout(x * math.sqrt(self.dim) + self.position(recency))
        x = x * mask.unsqueeze(-1)
        future = torch.ones(width, width, dtype=torch.bool, device=x.device).triu(1)
        eye = torch.eye(width, dtype=torch.bool, device=x.device)
        # Block the future and padding keys; a padded query may see itself, so no row is empty.
        blocked = future | (~mask.unsqueeze(1) & ~eye)
        blocked = blocked.repeat_interleave(self.num_heads, dim=0)
        return self.norm(self.blocks(x, mask=blocked))


class LastState(nn.Module):
    """The encoder's state at the last (most recent) position: the user's next-item query."""

    def __init__(self, encoder: CausalEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.dim = encoder.dim  # the item vectors' width (Head.query_network)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(x, mask)[:, -1]


class SequentialHead(Head):
    task = "sequential"
    data_sized = ("ids.weight", "text_table", "id_known")

    def __init__(
        self,
        hidden_size: int,
        dim: int = 64,
        num_layers: int = 2,
        num_heads: int = 2,
        dropout: float = 0.2,
        max_len: int = 50,
        text: bool = True,
        id_embedding: bool = False,
        item_embeddings: str = "cached",
        negatives: int = 0,
        item_batch_size: int = 256,
        id_dropout: float = 0.0,
        logq: bool = False,
    ) -> None:
        super().__init__(hidden_size)
        if not 0.0 <= id_dropout < 1.0 or (id_dropout and not (text and id_embedding)):
            raise ConfigError(
                "head.net.id_dropout",
                id_dropout,
                "a probability in [0, 1), above 0 only with text and head.net.id_embedding=true",
            )
        if logq and not (text and item_embeddings == "trained"):
            raise ConfigError(
                "head.net.logq",
                logq,
                "false, or head.net.item_embeddings=trained with text: only the in-batch "
                "softmax of the trained item side samples its candidates by popularity",
            )
        if item_embeddings not in ITEM_EMBEDDINGS:
            raise ConfigError(
                "head.net.item_embeddings", item_embeddings, f"one of {list(ITEM_EMBEDDINGS)}"
            )
        if not (text or id_embedding):
            raise ConfigError(
                "head.net.text", text, "true, or head.net.id_embedding=true (items need a vector)"
            )
        self.text, self.use_ids, self.mode = text, id_embedding, item_embeddings
        self.negatives, self.item_batch_size = negatives, item_batch_size
        # With text and IDs, each training step drops a random `id_dropout` share of the
        # items' ID vectors, so those items are scored by their text alone: the ID vector
        # cannot carry the whole model, and the text path stays good for items without one.
        self.id_dropout = id_dropout
        # logQ correction (Yi et al., RecSys 2019) of the in-batch softmax of the trained
        # item side: a popular item is a candidate in more batches, so it is pushed down more
        # often than a full softmax would; subtracting log(its frequency) undoes that bias.
        self.logq = logq
        self.register_buffer("log_frequency", torch.zeros(0), persistent=False)
        self.dim = dim
        self.encoder = CausalEncoder(dim, max_len, num_layers, num_heads, dropout)
        self.project = None
        if text:
            self.project = nn.Sequential(nn.Linear(hidden_size, dim), nn.LayerNorm(dim))
            # Start text vectors at the ID embeddings' scale (std dim^-0.5): the encoder
            # multiplies inputs by sqrt(dim), as SASRec does, to put them beside positions.
            nn.init.constant_(self.project[1].weight, dim**-0.5)
        self.item_dropout = nn.Dropout(dropout)
        # One learned vector per item; `attach` sizes it to the catalogue.
        self.ids = nn.Embedding(0, dim) if id_embedding else None
        # Backbone text embedding of every item [n_items, hidden]; saved with the model, so a
        # served model needs no backbone pass per request.
        self.register_buffer("text_table", torch.zeros(0, hidden_size if text else 0))
        # Which items had training interactions when the model last trained: with text, only
        # their ID vectors are used. An unseen item's ID vector never met a positive, only
        # the softmax's push-down, so it would bury a new item that its text can place.
        self.register_buffer("id_known", torch.zeros(0, dtype=torch.bool))
        self._trained_items: torch.Tensor | None = None
        # Whether `text_table` came in with loaded weights (a warm start, a resumed run): the
        # frozen backbone would embed the same texts again, so fit start keeps it.
        self._table_loaded = False
        self.register_load_state_dict_post_hook(_note_loaded_table)
        self._eval_table: torch.Tensor | None = None
        # A compiled user side (use_query_network), set past nn.Module.__setattr__: an
        # onnxruntime graph is not a submodule and holds nothing to train or save.
        object.__setattr__(self, "_query_network", None)

    # -- catalogue ------------------------------------------------------------------------
    @property
    def num_items(self) -> int:
        return len(self.ids.weight) if self.ids is not None else len(self.text_table)

    def attach(self, data: PreparedData) -> None:
        """Size the per-item parameters and buffers for the catalogue."""
        super().attach(data)
        if self.use_ids:
            init = lambda t: nn.init.normal_(t, std=self.dim**-0.5)  # noqa: E731
            self.resize("ids.weight", (data.num_items, self.dim), init)
            # all known until training says otherwise (a model saved before this flag)
            self.resize("id_known", (data.num_items,), lambda t: t.fill_(True))
            self._trained_items = torch.as_tensor(data.item_counts > 0)
        if self.text:
            self.resize("text_table", (data.num_items, self.hidden_size))
        if self.logq:
            counts = torch.as_tensor(data.item_counts, dtype=torch.float32) + 1.0  # no log(0)
            self.log_frequency = (counts / counts.sum()).log().to(self.text_table.device)

    def bind(self, backbone: Backbone) -> None:
        trainable = any(p.requires_grad for p in backbone.parameters())
        if self.text and self.mode == "cached" and trainable:
            raise ConfigError(
                "head.net.item_embeddings",
                "cached",
                "a frozen backbone (freeze=head_only, best with peft=none): cached item "
                "embeddings never pass gradients to it; or head.net.item_embeddings=trained "
                "to fine-tune the backbone through the items",
            )

    @torch.no_grad()
    def embed_texts(self, backbone: Backbone, batches) -> torch.Tensor:
        """Pooled backbone embedding of every item, in catalogue order."""
        parts = []
        for batch in batches:
            parts.append(backbone(batch.item_ids, batch.item_mask).float())
        return torch.cat(parts)

    def on_fit_start(self, backbone: Backbone, items: Iterable[ItemBatch]) -> None:
        """Cached mode embeds the catalogue once, on the training device, before step one;
        the items with training interactions are the ones whose ID vectors count."""
        if self.mode == "cached" and not self._table_loaded:
            self.cache_items(backbone, items)
        if self.use_ids and self._trained_items is not None:
            self.id_known.copy_(self._trained_items.to(self.id_known.device))

    def cache_items(self, backbone: Backbone, batches) -> None:
        """Compute the text table once (cached mode); a no-op when nothing reads text."""
        if self.text:
            # In place: evaluation runs under inference mode, and a tensor created there could
            # not be loaded into later (checkpoint restore).
            self.text_table.copy_(self.embed_texts(backbone, batches))

    def vectors_of(self, text: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor:
        """Item vectors [len(index), d] from text embeddings (rows for `index`) and IDs."""
        out = 0.0
        if self.text:
            out = self.project(text)
        if self.use_ids:
            ids = self.ids(index)
            if self.text and len(self.id_known):  # an unseen item is its text alone
                ids = ids * self.id_known[index].unsqueeze(-1)
            if self.training and self.id_dropout > 0:
                # One draw per row: an item dropped this step is text alone everywhere in it.
                kept = torch.rand(len(index), 1, device=ids.device) >= self.id_dropout
                ids = ids * kept
            out = out + ids
        return out

    def table(self) -> torch.Tensor:
        """Vectors of the whole catalogue from the cached text table [n_items, d]."""
        index = torch.arange(self.num_items, device=self.encoder.position.weight.device)
        return self.vectors_of(self.text_table if self.text else None, index)

    # -- training -------------------------------------------------------------------------
    def loss(self, backbone: Backbone | None, batch: SequenceBatch) -> torch.Tensor:
        if self.text and self.mode == "trained":
            text = backbone(batch.unique_ids, batch.unique_mask).float()
            candidates = self.vectors_of(text, batch.unique)
            local = torch.searchsorted(batch.unique, batch.items.clamp_min(0))
            targets = torch.searchsorted(batch.unique, batch.targets.clamp_min(0))
            targets = targets.masked_fill(batch.targets == IGNORE, IGNORE)
            states = self.encoder(self.item_dropout(candidates[local]), batch.mask)
            correction = self.log_frequency[batch.unique] if self.logq else None
            return self._softmax(states, targets, candidates, correction)
        table = self.table()
        states = self.encoder(self.item_dropout(table[batch.items]), batch.mask)
        if self.negatives <= 0:
            return self._softmax(states, batch.targets, table)
        return self._sampled_softmax(states, batch.targets, table)

    @staticmethod
    def _softmax(states, targets, table, correction: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy over `table`'s rows; `correction` (log frequency per row) is
        subtracted from the logits (logQ)."""
        keep = targets != IGNORE
        logits = (states[keep] @ table.T).float()
        if correction is not None:
            logits = logits - correction
        return F.cross_entropy(logits, targets[keep])

    def _sampled_softmax(self, states, targets, table) -> torch.Tensor:
        keep = targets != IGNORE
        states, targets = states[keep], targets[keep]
        negatives = torch.randint(0, len(table), (self.negatives,), device=table.device)
        positive = (states * table[targets]).sum(-1, keepdim=True)
        negative = states @ table[negatives].T
        negative = negative.masked_fill(negatives.unsqueeze(0) == targets.unsqueeze(1), -1e9)
        logits = torch.cat([positive, negative], dim=1).float()
        return F.cross_entropy(logits, torch.zeros_like(targets))

    # -- evaluation / serving -------------------------------------------------------------
    @torch.no_grad()
    def on_eval_start(self, backbone: Backbone | None, items: Iterable[ItemBatch]) -> None:
        """Item vectors for ranking; a trained backbone re-embeds the texts first."""
        if self.text and self.mode == "trained":
            self.cache_items(backbone, items)
        self._eval_table = self.table()

    def score_catalogue(self, backbone: Backbone | None, batch: SequenceBatch) -> torch.Tensor:
        """Scores [B, n_items]: the last position's state (the user's next-item query)
        against the vectors `on_eval_start` computed."""
        if self._eval_table is None:
            raise RuntimeError("on_eval_start() must run before scoring users")
        state = self.last_state(self._eval_table[batch.items], batch.mask)
        return state @ self._eval_table.T

    def last_state(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Queries [B, d] of item-vector sequences: through the compiled network when one is
        in use, else the encoder (what training runs)."""
        if self._query_network is not None:
            return self._query_network(x, mask)
        return self.encoder(x, mask)[:, -1]

    def query_network(self) -> nn.Module:
        return LastState(self.encoder).eval()

    def use_query_network(self, network) -> None:
        object.__setattr__(self, "_query_network", network)

    def evaluate(self, backbone, batch: SequenceBatch, metrics: RankingMetrics) -> None:
        metrics.update(self.score_catalogue(backbone, batch), batch.relevant, batch.exclude)

    # -- inference: only the small network and the cached table, never the backbone ---------
    ranks_by_vectors = True

    @torch.no_grad()
    def item_vectors(self, backbone: Backbone | None, items: ItemBatch) -> torch.Tensor:
        """Trained items: their rows of the cached table (text + ID vector). Items added
        after training: the backbone embeds their text and they have no learned ID vector."""
        index = items.item_index.to(self.encoder.position.weight.device)
        known = index < self.num_items
        text = None
        if self.text:
            text = torch.zeros(len(index), self.hidden_size, device=index.device)
            if known.any():
                text[known] = self.text_table[index[known]]
            if not known.all():
                new = ~known.to(items.item_ids.device)
                text[~known] = backbone(items.item_ids[new], items.item_mask[new]).float()
        out = self.project(text) if self.text else 0.0
        if self.use_ids:
            clamped = index.clamp(max=max(self.num_items - 1, 0))
            ids = self.ids(clamped) * known.unsqueeze(-1)
            if self.text and len(self.id_known):
                ids = ids * self.id_known[clamped].unsqueeze(-1)
            out = out + ids
        return out

    @torch.no_grad()
    def query_vectors(self, backbone, histories, table: torch.Tensor) -> torch.Tensor:
        """The last state of the causal encoder over each history's item vectors (left-padded,
        the most recent `max_len` items)."""
        recent = [list(h)[-self.encoder.max_len :] for h in histories]
        width = max(1, max(len(h) for h in recent))
        # Built in numpy: per-row tensor writes cost more than the encoder on one user.
        items = np.zeros((len(recent), width), dtype=np.int64)
        for row, h in enumerate(recent):
            if h:
                items[row, width - len(h) :] = h
        mask = torch.from_numpy(
            np.arange(width) >= width - np.array([len(h) for h in recent])[:, None]
        )
        items = torch.from_numpy(items).to(table.device)
        return self.last_state(table[items], mask.to(table.device))

    def _user_scores(self, history: Sequence[int]) -> torch.Tensor:
        if self._eval_table is None:  # a freshly loaded model: the saved table is enough
            self._eval_table = self.table()
        recent = list(history)[-self.encoder.max_len :]
        items = torch.as_tensor([recent], device=self._eval_table.device)
        batch = SequenceBatch(items, torch.ones_like(items, dtype=torch.bool))
        return self.score_catalogue(None, batch)[0]

    @torch.no_grad()
    def score(self, backbone: Backbone | None, history, candidates) -> torch.Tensor:
        """The user's next-item state against each candidate's vector."""
        index = torch.as_tensor(list(candidates), dtype=torch.long)
        return self._user_scores(history)[index.to(self._eval_table.device)]

    @torch.no_grad()
    def recommend(self, backbone: Backbone | None, history, k: int = 10, exclude=()):
        """Top-k items from cached vectors (history and `exclude` left out)."""
        return top_k(self._user_scores(history), k, [*history, *exclude])


def _note_loaded_table(head: SequentialHead, incompatible_keys) -> None:
    # A table of zeros is one that was never computed (a fresh head's sized buffer).
    head._table_loaded = bool(head.text and head.text_table.numel() and head.text_table.any())
