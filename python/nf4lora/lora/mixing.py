"""Task-arithmetic mixing of stacked tensors t_i with weights w_i (the math behind
add_weighted_adapter's pruning variants; the same definitions as PEFT's merge utilities, so the
same inputs, and the same torch RNG state for the random ones, give the same result):

  linear              sum_i w_i t_i
  magnitude_prune     each t_i keeps its top density * numel entries by |value|, then linear
  ties                magnitude pruning, then per entry the sign with the larger total (or more
                      votes: majority_sign_method="frequency"); entries of that sign are averaged:
                      sum_i w_i t_i [sign agrees] / max(1, #agreeing)
  dare_linear         each t_i keeps entries with probability density (torch.bernoulli) and is
                      divided by density, then linear
  dare_ties           dare's random pruning, then ties' sign election and disjoint mean
density >= 1 prunes nothing.
"""
import torch

METHODS = ("linear", "magnitude_prune", "ties", "dare_linear", "dare_ties")


def _top_magnitude(t, density):
    keep = torch.zeros(t.numel(), dtype=t.dtype, device=t.device)
    k = int(density * t.numel())
    keep[torch.topk(t.abs().reshape(-1), k=k, largest=True).indices] = 1
    return t * keep.reshape(t.shape)


def _random_keep(t, density):
    return t * torch.bernoulli(torch.full_like(t, density)) / density


def _sparsify(tensors, density, how):
    if density >= 1:
        return list(tensors)
    return [_top_magnitude(t, density) if how == "magnitude" else _random_keep(t, density) for t in tensors]


def _weighted(stack, weights):
    return stack * weights.view(weights.shape + (1,) * (stack.dim() - 1))


def _elect_and_average(stack, weights, sign_method):
    sign = stack.sign()
    if sign_method == "total":
        strength = stack.sum(dim=0)
    elif sign_method == "frequency":
        strength = sign.sum(dim=0)
    else:
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {sign_method!r}")
    agree = sign == torch.where(strength >= 0, 1, -1)
    return (_weighted(stack, weights) * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def mix(tensors, weights, method, density=None, majority_sign_method="total"):
    """Mix the same-shaped `tensors` with `weights` (a 1-D tensor, one per tensor) by `method`."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "linear":
        if density is None or isinstance(density, bool) or not isinstance(density, (int, float)) \
                or not 0.0 <= density:
            raise ValueError(f"density must be a number in [0, 1] for {method!r}, got {density!r}")
    if method in ("magnitude_prune", "ties"):
        tensors = _sparsify(tensors, density, "magnitude")
    elif method in ("dare_linear", "dare_ties"):
        tensors = _sparsify(tensors, density, "random")
    stack = torch.stack(list(tensors), dim=0)
    if method in ("ties", "dare_ties"):
        return _elect_and_average(stack, weights, majority_sign_method)
    return _weighted(stack, weights).sum(dim=0)
