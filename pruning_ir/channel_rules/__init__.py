"""Channel rules, one small function per op, registered by op name or module type.

Where each op's rule lives:
- ``elementwise``: activations, add/sub/mul/div with broadcasting, reductions, softmax.
- ``layers``: conv, transposed conv, linear, matmul/addmm, batch/instance/group/layer norm, embedding, PReLU.
- ``shapes``: view/reshape/flatten, permute/transpose, expand/repeat, cat/stack, split/chunk, indexing.
- ``factories``: new tensors: zeros_like and the like, torch.zeros/ones/full/empty/rand sized by module attributes.
- ``spatial``: pooling, interpolate, pad, pixel shuffle, channel shuffle.
- ``attention``: scaled_dot_product_attention, nn.MultiheadAttention, grouped-query attention's two units
  (``GQA_UNITS``).
- ``recurrent``: LSTM/GRU/RNN.
- ``complex_views``: view_as_complex/view_as_real (rotary embeddings in complex numbers).
"""

from . import attention, complex_views, elementwise, factories, layers, recurrent, shapes, spatial  # noqa: F401
from .attention import GQA_UNITS
from .registry import RuleContext, channel_rule, find_rule, module_rule, registered_ops

__all__ = ["RuleContext", "channel_rule", "module_rule", "find_rule", "registered_ops", "GQA_UNITS"]
