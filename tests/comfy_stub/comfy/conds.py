"""Stand-in for comfy/conds.py: the condition wrappers `extra_conds` returns and samplers batch with `process_cond`."""

import torch


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    if tensor.shape[0] < batch_size:
        return tensor.repeat([math_ceil(batch_size, tensor.shape[0])] + [1] * (tensor.ndim - 1))[:batch_size]
    return tensor


def math_ceil(a, b):
    return -(-a // b)


class CONDRegular:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size))


class CONDNoiseShape(CONDRegular):
    def process_cond(self, batch_size, area, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size))


class CONDCrossAttn(CONDRegular):
    pass


class CONDConstant(CONDRegular):
    def process_cond(self, batch_size, **kwargs):
        return self._copy_with(self.cond)


class CONDList(CONDRegular):
    def process_cond(self, batch_size, **kwargs):
        return self._copy_with([repeat_to_batch_size(c, batch_size) for c in self.cond])


__all__ = ["CONDConstant", "CONDCrossAttn", "CONDList", "CONDNoiseShape", "CONDRegular", "torch"]
