"""sentence-transformers' pooling and normalisation, computed in the graph: the same arithmetic as
its ``Pooling`` module (sentence-transformers 6, padded inputs) and ``Normalize`` module, so that
``sentence_embedding`` is what ``SentenceTransformer.encode`` returns."""

from __future__ import annotations


def pool(hidden, mask, modes: tuple[str, ...], normalize: bool):
    """(batch, sequence, dim) token embeddings and a (batch, sequence) mask -> (batch, len(modes)·dim)."""
    import torch

    outputs = []
    h = hidden
    dim = h.shape[-1]
    m = mask.unsqueeze(-1).to(h.dtype)
    for mode in modes:
        if mode == "cls":  # the first real token (left padding skipped)
            first = mask.to(torch.int32).argmax(dim=1)
            outputs.append(torch.gather(h, 1, first.view(-1, 1, 1).expand(-1, 1, dim)).squeeze(1))
        elif mode == "max":
            outputs.append(h.masked_fill(m.expand_as(h) == 0, float("-inf")).max(dim=1).values)
        elif mode in ("mean", "mean_sqrt_len_tokens"):
            total = (h * m).sum(dim=1)
            count = torch.clamp(m.sum(dim=1), min=1e-9)
            outputs.append(total / (count if mode == "mean" else torch.sqrt(count)))
        elif mode == "weightedmean":  # position weights 1..n, counted from the first real token
            weights = torch.arange(1, h.shape[1] + 1, dtype=h.dtype).view(1, -1, 1)
            weights = weights - mask.to(torch.int32).argmax(dim=1).view(-1, 1, 1).to(h.dtype)
            weighted = m * weights
            outputs.append((h * weighted).sum(dim=1) / torch.clamp(weighted.sum(dim=1), min=1e-9))
        elif mode == "lasttoken":  # the last real token (right padding skipped)
            seq = h.shape[1]
            values, indices = mask.to(torch.int32).flip(1).max(1)
            indices = torch.where(values == 0, seq - 1, indices)
            last = (seq - indices - 1).view(-1, 1, 1).expand(-1, 1, dim)
            outputs.append(torch.gather(h * m, 1, last).squeeze(1))
    embedding = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
    return torch.nn.functional.normalize(embedding, p=2, dim=-1) if normalize else embedding
