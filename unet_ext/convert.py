"""unet_ext.convert(model): runs an existing nn.Module's stock U-Net layers on unet_ext's kernels.

Nothing is copied or renamed: eligible modules change class in place to a subclass of their own
(so state_dict keys, isinstance and checkpoints stay as they were), modules absorbed into a
fusion are skipped in the forward but kept in the model, and a forward that torch.fx traces is
rewritten (same code, fused calls) on the model itself. Each converted layer picks our kernel
or the stock one per call, by the measured rule in `ours_is_faster` (see benchmarks/bench_convert.py).
"""
import copy
import functools
import importlib
import operator
import types
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import nn as fused
from . import ops

__all__ = ["convert", "ConversionReport", "ours_is_faster"]

_RELUS = (F.relu, torch.relu, torch.relu_)
_POLICIES = ("auto", "always")


# --- the rule: which shapes run faster on our kernels -------------------------------------------

def ours_is_faster(kind, x, in_channels=0, out_channels=0, kernel_size=(3, 3)):
    """Whether our kernel beats stock PyTorch for this layer on x (measured on the 2-core CPU,
    float32, NCHW: benchmarks/bench_conv.py, bench_max_pool.py and the sweep in bench_convert.py).

    - conv ("conv2d_relu", "conv2d_bias", "conv2d_relu_concat"; in_channels counts both inputs
      of the concat): our per-tap GEMMs win where both channel counts are <= 128, at every map
      size measured (1.2-7.8x at 3-64 channels and 512x512, 2.7x 64 -> 64 at 128x128, 1.6-1.8x
      128 -> 128 at 64x64; at 12x12 stock is bimodal, 0.12-37 ms, ours 0.15-0.3 ms), and 1x1
      heads too (7-11x). From 256 input channels both run oneDNN (0.98-1.02x: stock, nothing
      to gain); 128 -> 256 measured 0.95-0.97x at 140x140 in bench_conv (1.2-1.3x at 64x64 in
      bench_convert), so it stays stock.
    - "conv_transpose2x2": 1.3-4.8x below 512 input channels, 0.99-1.01x from 512 (oneDNN both).
    - "max_pool2x2": 7-24x NCHW; channels_last measured 0.73-0.78x at 128-256 channels: stock.
    Only the CPU: the CUDA kernels have not been timed against cuDNN yet, so stock keeps CUDA.
    """
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 4:
        return False
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return False
    if kind == "max_pool2x2":
        return True
    if kind == "conv_transpose2x2":
        return in_channels < 512
    return in_channels <= 128 and out_channels <= 128


def _use_ours(module, kind, x, in_channels, out_channels, kernel_size=(3, 3)):
    if module._unet_ext_policy == "always":
        return True
    return ours_is_faster(kind, x, in_channels, out_channels, kernel_size)


# --- converted layers: subclasses of the stock ones, same parameters --------------------------

def _folded(conv, bn):
    """conv's weight and bias with the eval-mode BatchNorm after it folded in:
    w * gamma / sqrt(var + eps), (b - mean) * gamma / sqrt(var + eps) + beta."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return conv.weight * scale.reshape(-1, 1, 1, 1), bias


def _weights(conv, bn):
    """The conv's weight and bias, with an eval-mode BN folded in (cached on the conv while no
    parameter or statistic changes: folding costs a pass over the weights per call)."""
    if bn is None or bn.training:
        return conv.weight, conv.bias
    tensors = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    if _tracing(tensors):
        return _folded(conv, bn)  # export/compile: the fold becomes part of the graph
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    key = tuple((t.data_ptr(), t._version, t.dtype) if t is not None else None for t in tensors) \
        + (torch.is_inference_mode_enabled(),)
    cache = getattr(conv, "_unet_ext_folded", None)
    if not grad and cache is not None and cache[0] == key:
        return cache[1]
    weights = _folded(conv, bn)
    if not grad:
        object.__setattr__(conv, "_unet_ext_folded", (key, weights))
    return weights


def _fused_conv(x, conv, bn, relu, policy, up=None, crop_of=None):
    """conv(x) [-> bn] [-> relu] as one call (what the rewritten forwards call; conv and bn are
    the model's own modules, left as they are). In eval mode the BN is folded into the weights;
    in training mode it runs stock between the conv and the ReLU (batch statistics). With `up`,
    x is the skip and the input is cat([x, up], 1), read in place by conv2d_relu_concat (x may
    be a crop of `crop_of`; a centre crop is read from crop_of directly)."""
    norm_after = bn is not None and bn.training
    use = (lambda kind, t, c_in: policy == "always"
           or ours_is_faster(kind, t, c_in, conv.out_channels, conv.kernel_size))
    if up is not None:
        if relu and not norm_after and use("conv2d_relu_concat", up, conv.in_channels):
            weight, bias = _weights(conv, bn)
            return ops.conv2d_relu_concat(_uncropped(x, crop_of, up), up, weight, bias, conv.padding[0])
        x = torch.cat([x, up], 1)
    weight, bias = _weights(conv, bn)
    if use("conv2d_relu" if relu else "conv2d_bias", x, conv.in_channels):
        op = ops.conv2d_relu if relu and not norm_after else ops.conv2d_bias
        y = op(x, weight, bias, conv.padding[0])
    else:
        y = F.conv2d(x, weight, bias, padding=conv.padding)
        if relu and not norm_after:
            y = F.relu(y)
    if norm_after:
        y = bn(y)
        if relu:
            y = F.relu(y)
    return y


class FusedConv2d(nn.Conv2d):
    """A Conv2d (stride 1) on conv2d_bias: our GEMM kernel with the bias in its epilogue."""

    def forward(self, input):
        if _use_ours(self, "conv2d_bias", input, self.in_channels, self.out_channels, self.kernel_size):
            return ops.conv2d_bias(input, self.weight, self.bias, self.padding[0])
        return super().forward(input)


def _tracing(tensors):
    """Whether these are the fake tensors of torch.export / torch.compile (no data pointers)."""
    if torch.compiler.is_compiling():
        return True
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor
    return any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors if t is not None)


def _uncropped(view, crop_of, up):
    """The skip that `view` centre-crops (so the fused op reads it in place), or view itself."""
    if crop_of is None or _tracing((view, crop_of)) or view.dim() != 4 or crop_of.dim() != 4 or view.stride() != crop_of.stride():
        return view
    top = (crop_of.shape[-2] - up.shape[-2]) // 2
    left = (crop_of.shape[-1] - up.shape[-1]) // 2
    offset = crop_of.storage_offset() + top * crop_of.stride(2) + left * crop_of.stride(3)
    same = (view.untyped_storage().data_ptr() == crop_of.untyped_storage().data_ptr()
            and view.storage_offset() == offset and view.shape[:2] == crop_of.shape[:2]
            and view.shape[-2:] == up.shape[-2:])
    return crop_of if same else view


class FusedConvTranspose2d(nn.ConvTranspose2d):
    """ConvTranspose2d(kernel 2, stride 2) on unet_ext.ops.conv_transpose2x2."""

    def forward(self, input, output_size=None):
        if output_size is None and _use_ours(self, "conv_transpose2x2", input, self.in_channels,
                                             self.out_channels):
            return ops.conv_transpose2x2(input, self.weight, self.bias)
        return super().forward(input, output_size)


class FusedMaxPool2d(nn.MaxPool2d):
    """MaxPool2d(2) on unet_ext.ops.max_pool2x2."""

    def forward(self, input):
        if input.dim() == 4 and _use_ours(self, "max_pool2x2", input, input.shape[1], input.shape[1]):
            return ops.max_pool2x2(input)
        return super().forward(input)


_LEAVES = (FusedConv2d, FusedConvTranspose2d, FusedMaxPool2d, fused.Conv2dReLU, fused.Conv2dBias,
           fused.UpConv2x2, fused.MaxPool2x2, fused.CropConcat)


def _max_pool2x2(input, policy):
    """F.max_pool2d(input, 2) as traced, on our kernel where the rule (or policy) says so."""
    if input.dim() == 4 and (policy == "always" or ours_is_faster("max_pool2x2", input)):
        return ops.max_pool2x2(input)
    return F.max_pool2d(input, 2)


# --- the report --------------------------------------------------------------------------------

@dataclass
class ConversionReport:
    """What convert() did: `replaced` and `kept` are (module name, what / why) pairs; `traced`
    says whether the model's forward was rewritten with torch.fx, `trace_error` why not (its
    submodules may still have been); `policy` is convert's."""
    replaced: List[Tuple[str, str]] = field(default_factory=list)
    kept: List[Tuple[str, str]] = field(default_factory=list)
    traced: Optional[bool] = None
    trace_error: Optional[str] = None
    policy: str = "auto"

    @property
    def nothing_converted(self):
        return not self.replaced

    def __str__(self):
        lines = [f"unet_ext.convert: {len(self.replaced)} replaced, {len(self.kept)} kept as they were"]
        if self.traced:
            lines.append("forward rewritten with torch.fx (functional calls included)")
        elif self.trace_error:
            lines.append(f"module level only: the forward was not rewritten with torch.fx ({self.trace_error})")
        if self.replaced and self.policy == "auto":
            lines.append("each replaced layer runs ours or stock per call, whichever is faster for its "
                         "input (unet_ext.convert.ours_is_faster)")
        if not self.replaced:
            lines.append("nothing to convert: no Conv2d(+BatchNorm2d)(+ReLU), ConvTranspose2d(2, stride 2) "
                         "or MaxPool2d(2) that unet_ext's kernels run")
        lines += [f"  replaced {name or '<model>'}: {what}" for name, what in self.replaced]
        lines += [f"  kept     {name or '<model>'}: {why}" for name, why in self.kept]
        return "\n".join(lines)


# --- eligibility ---------------------------------------------------------------------------------

def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _conv_why_not(conv):
    """None if our conv kernels compute this Conv2d, else why not."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.stride != (1, 1):
        return f"stride {conv.stride} (our kernels: stride 1)"
    if conv.groups != 1 or conv.dilation != (1, 1):
        return f"groups {conv.groups}, dilation {conv.dilation} (our kernels: 1)"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}"
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            conv.padding = (0, 0)
        elif conv.kernel_size[0] == conv.kernel_size[1] and conv.kernel_size[0] % 2 == 1:
            conv.padding = (conv.kernel_size[0] // 2,) * 2  # "same", odd square kernel
        else:
            return f"padding {conv.padding!r} with kernel {conv.kernel_size}"
    if conv.padding[0] != conv.padding[1]:
        return f"padding {conv.padding} differs per side (our kernels: one padding)"
    return None


def _conv_transpose_why_not(m):
    if type(m) is not nn.ConvTranspose2d:
        return f"{type(m).__name__} is not a plain nn.ConvTranspose2d"
    if (m.kernel_size, m.stride, m.padding, m.output_padding, m.groups, m.dilation) != \
            ((2, 2), (2, 2), (0, 0), (0, 0), 1, (1, 1)):
        return f"kernel {m.kernel_size}, stride {m.stride} (ours: kernel 2, stride 2, no padding)"
    return None


def _max_pool_why_not(m):
    if type(m) is not nn.MaxPool2d:
        return f"{type(m).__name__} is not a plain nn.MaxPool2d"
    stride = m.stride if m.stride is not None else m.kernel_size
    if (_pair(m.kernel_size), _pair(stride), _pair(m.padding), _pair(m.dilation), m.ceil_mode,
            m.return_indices) != ((2, 2), (2, 2), (0, 0), (1, 1), False, False):
        return f"kernel {m.kernel_size}, stride {stride} (ours: 2x2, stride 2)"
    return None


def _is_torch_nn(m):
    return type(m).__module__.startswith("torch.nn.")


def _is_identity(m):
    return type(m) is nn.Identity or (type(m) in (nn.Dropout, nn.Dropout2d) and m.p == 0)


def _is_relu_module(m):
    return type(m) is nn.ReLU


def _is_bn(m):
    return type(m) is nn.BatchNorm2d and m.track_running_stats


# --- conversion ------------------------------------------------------------------------------------

def _describe(bn, relu):
    return " + ".join(["Conv2d"] + (["BatchNorm2d (folded in eval)"] if bn is not None else [])
                      + (["ReLU"] if relu else []))


def _same_outputs(a, b):
    leaves_a, leaves_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    if len(leaves_a) != len(leaves_b):
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape:
                return False
            scale = max(1.0, float(x.detach().abs().max())) if x.numel() else 1.0
            if not torch.allclose(x.detach().float(), y.detach().float(), rtol=1e-3, atol=1e-4 * scale):
                return False
    return True


class _Converter:
    def __init__(self, model, policy, captured):
        self.model, self.policy = model, policy
        self.captured = captured  # module -> (args, kwargs) of its first call on the example
        self.report = ConversionReport(policy=policy)
        self.names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        self.in_graphs = set()  # convs that a rewritten forward runs through _fused_conv

    def name(self, m):
        return self.names.get(m, "?")

    def mark(self, m, cls):
        m.__class__ = cls
        object.__setattr__(m, "_unet_ext_policy", self.policy)

    def swap_leaves(self):
        """ConvTranspose2d(2, 2) and MaxPool2d(2) anywhere: same parameters, our forward."""
        for name, m in self.model.named_modules():
            if isinstance(m, nn.ConvTranspose2d):
                why = _conv_transpose_why_not(m)
                if why is None:
                    self.mark(m, FusedConvTranspose2d)
                    self.report.replaced.append((name, "ConvTranspose2d(2, stride 2) -> conv_transpose2x2"))
                elif not isinstance(m, FusedConvTranspose2d):
                    self.report.kept.append((name, why))
            elif isinstance(m, nn.MaxPool2d):
                why = _max_pool_why_not(m)
                if why is None:
                    self.mark(m, FusedMaxPool2d)
                    self.report.replaced.append((name, "MaxPool2d(2) -> max_pool2x2"))
                elif not isinstance(m, FusedMaxPool2d):
                    self.report.kept.append((name, why))

    def rewrite_forwards(self, module, prefix):
        """Rewrites module's forward with torch.fx; where that is not possible (or not checked
        against the real forward), its children's. Returns why module itself was not
        rewritten, or None."""
        containers = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
        if isinstance(module, _LEAVES) or (_is_torch_nn(module) and not isinstance(module, containers)):
            return None
        if type(module).forward is nn.Module.forward:  # containers (ModuleList, ModuleDict)
            error = "no forward"
        else:
            error = self.try_rewrite(module)
            if error is None:
                return None
        for name, child in module.named_children():
            self.rewrite_forwards(child, f"{prefix}.{name}" if prefix else name)
        if prefix and error != "no forward":
            self.report.kept.append((prefix, f"forward not rewritten ({error}); its parts converted one by one"))
        return error

    def try_rewrite(self, module):
        try:
            gm = _trace(module)
        except Exception as exc:  # noqa: BLE001 - any tracing failure: a level down
            return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        replaced = _rewrite_graph(gm, module, self)
        if not replaced:
            return None  # nothing functional to fuse here; the modules convert on their own
        forward = types.MethodType(type(gm).forward, module)
        # A trace follows one path through the Python code (isinstance checks, `is None`), which
        # need not be the path real inputs take: the rewrite is kept only where it gives the
        # original forward's outputs on the example input (an nn.Sequential has one path).
        if not isinstance(module, nn.Sequential) or type(module).forward is not nn.Sequential.forward:
            if module not in self.captured:
                return "not checked: no example input reached it (pass example_inputs)"
            args, kwargs = self.captured[module]
            was_training = module.training
            try:
                module.eval()
                with torch.no_grad():
                    expected = module(*args, **kwargs)
                    got = forward(*args, **kwargs)
                same = _same_outputs(expected, got)
            except Exception as exc:  # noqa: BLE001 - a wrong trace may fail on real inputs
                same, why = False, f"{type(exc).__name__}"
            else:
                why = "different outputs"
            finally:
                module.train(was_training)
            if not same:
                return f"the traced forward does not match the real one on the example input ({why})"
        # The source and its globals (importable functions) plus a partial of a module-level
        # function keep the model picklable: torch.save(model) works as before conversion.
        python_code = gm.graph.python_code(root_module="self")
        # Python modules among the globals (torch) are kept by name.
        globals_ = {k: _ModuleName(v.__name__) if isinstance(v, types.ModuleType) else v
                    for k, v in python_code.globals.items()}
        object.__setattr__(module, "_unet_ext_source", (python_code.src, globals_))
        module.forward = functools.partial(_run_graph, module)
        object.__setattr__(module, "_unet_ext_code", gm.code)
        for conv, what in replaced:
            if conv is not None:
                self.in_graphs.add(conv)
            self.report.replaced.append((self.name(conv) if conv is not None else type(module).__name__ + " (functional)", what))
        return None

    def lone_convs(self):
        """Conv2d run on their own (not by a rewritten forward): conv2d_bias."""
        for name, m in self.model.named_modules():
            if m in self.in_graphs:
                continue
            if isinstance(m, nn.Conv2d) and type(m) not in (nn.Conv2d, FusedConv2d):
                self.report.kept.append((name, f"{type(m).__name__} subclasses nn.Conv2d (its forward may differ)"))
            elif type(m) is nn.Conv2d:
                why = _conv_why_not(m)
                if why is None:
                    self.mark(m, FusedConv2d)
                    self.report.replaced.append((name, "Conv2d -> conv2d_bias"))
                else:
                    self.report.kept.append((name, why))


class _ModuleName(str):
    """A Python module among a rewritten forward's globals, kept by name (modules do not pickle)."""


_COMPILED = {}  # source text of a rewritten forward -> the compiled function


def _run_graph(module, *args, **kwargs):
    """module's rewritten forward: the traced graph's code, run on module itself (the code
    reaches every submodule by its path from the root, which module has too)."""
    source, globals_ = module._unet_ext_source
    forward = _COMPILED.get(source)
    if forward is None:  # the same source text has the same globals (names of fx's code)
        namespace = {k: importlib.import_module(v) if isinstance(v, _ModuleName) else v
                     for k, v in globals_.items()}
        exec(compile(source, "<unet_ext.convert>", "exec"), namespace)  # noqa: S102 - fx's own code
        forward = _COMPILED[source] = namespace["forward"]
    return forward(module, *args, **kwargs)


class _Tracer(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _trace(model):
    """The model's forward as an fx GraphModule, traced in its current mode; raises if the code
    depends on the mode (it would be frozen into the rewritten forward)."""
    was_training = model.training
    graphs = []
    try:
        for mode in (was_training, not was_training):
            model.train(mode)
            graph = _Tracer().trace(model)
            graphs.append(torch.fx.GraphModule(model, graph))
    finally:
        model.train(was_training)
    if graphs[0].code != graphs[1].code:
        raise RuntimeError("the forward differs between training and eval mode")
    return graphs[0]


def _only_user(node):
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _is_relu_node(node, modules):
    if node is None:
        return False
    if node.op == "call_module":
        return _is_relu_module(modules.get(node.target))
    if node.op == "call_function":
        return node.target in _RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _is_max_pool2x2_call(node):
    if node.op != "call_function" or node.target is not F.max_pool2d or len(node.args) > 3:
        return False
    sizes = list(node.args[1:]) + [node.kwargs[k] for k in ("kernel_size", "stride") if k in node.kwargs]
    rest = {k: v for k, v in node.kwargs.items() if k not in ("kernel_size", "stride")}
    defaults = {"padding": 0, "dilation": 1, "ceil_mode": False, "return_indices": False}
    return (len(sizes) >= 1 and all(_pair(a) == (2, 2) for a in sizes if a is not None)
            and all(k in defaults and _pair(v) == _pair(defaults[k]) for k, v in rest.items()))


def _functional_conv(node):
    """(input, weight, bias, padding) if node is F.conv2d(input, <parameter>, <parameter or
    None>, ...) with stride 1, dilation 1, groups 1 and one zero padding; else None."""
    if node.op != "call_function" or node.target not in (F.conv2d, torch.conv2d):
        return None
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = (None, None, None, 1, 0, 1, 1)
    values = dict(zip(names, defaults))
    values.update(zip(names, node.args))
    values.update(node.kwargs)
    weight, bias, padding = values["weight"], values["bias"], values["padding"]
    if not (isinstance(weight, torch.fx.Node) and weight.op == "get_attr"):
        return None
    if bias is not None and not (isinstance(bias, torch.fx.Node) and bias.op == "get_attr"):
        return None
    if padding == "valid":
        padding = 0
    if isinstance(padding, str) or len(set(_pair(padding))) != 1 or _pair(values["stride"]) != (1, 1) \
            or _pair(values["dilation"]) != (1, 1) or values["groups"] != 1:
        return None
    return (values["input"], weight, bias, _pair(padding)[0])


def _conv2d_relu(input, weight, bias, padding, policy):
    """relu(F.conv2d(input, weight, bias, padding=padding)) as traced, on our kernel where the
    rule (or policy) says so."""
    if policy == "always" or ours_is_faster("conv2d_relu", input, weight.shape[1], weight.shape[0],
                                            tuple(weight.shape[-2:])):
        return ops.conv2d_relu(input, weight, bias, padding)
    return F.relu(F.conv2d(input, weight, bias, padding=padding))


def _cat_inputs(node):
    """(skip, up, crop_of) if node is torch.cat([skip, up], 1) (crop_of: what skip slices)."""
    if not (isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is torch.cat
            and len(node.users) == 1):
        return None
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim != 1:
        return None
    skip, up = tensors
    crop_of = None
    if isinstance(skip, torch.fx.Node) and skip.op == "call_function" and skip.target is operator.getitem \
            and isinstance(skip.args[0], torch.fx.Node):
        crop_of = skip.args[0]  # checked per call: a centre crop is read in place
    return skip, up, crop_of


def _rewrite_graph(gm, root, converter):
    """In gm's graph: conv [-> bn] [-> relu] chains (module or functional ReLU) -> _fused_conv;
    F.relu(F.conv2d(x, self.weight, self.bias, ...)) -> conv2d_relu;
    a cat([crop(skip), up], 1) feeding a conv + ReLU -> its conv2d_relu_concat form;
    F.max_pool2d(x, 2) -> max_pool2x2. Returns [(conv module of root or None, what)] replaced."""
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    replaced = []
    for node in list(graph.nodes):
        if _is_max_pool2x2_call(node):
            node.target, node.args, node.kwargs = _max_pool2x2, (node.args[0], converter.policy), {}
            replaced.append((None, "F.max_pool2d(x, 2) -> max_pool2x2"))
            continue
        conv_call = _functional_conv(node)
        if conv_call is not None:
            nxt = _only_user(node)
            if _is_relu_node(nxt, modules) and nxt.args and nxt.args[0] is node:
                with graph.inserting_before(node):
                    fused_node = graph.call_function(_conv2d_relu, conv_call + (converter.policy,))
                nxt.replace_all_uses_with(fused_node)
                graph.erase_node(nxt)
                graph.erase_node(node)
                prefix = conv_call[1].target.rpartition(".")[0]
                # gm holds placeholders for modules reached only through get_attr: ask root.
                owner = root.get_submodule(prefix)  # "": root itself (a Conv2d subclass)
                replaced.append((owner, "F.conv2d + ReLU (functional) -> conv2d_relu"))
            continue
        if node.op != "call_module" or type(modules.get(node.target)) is not nn.Conv2d:
            continue
        conv = modules[node.target]
        # A module called twice may be followed by different layers at each call: leave it.
        if calls[node.target] != 1 or _conv_why_not(conv) is not None or node.kwargs:
            continue
        chain, bn = [node], None
        nxt = _only_user(node)
        if nxt is not None and nxt.op == "call_module" and _is_bn(modules.get(nxt.target)) \
                and calls[nxt.target] == 1 and nxt.args[0] is node:
            bn = modules[nxt.target]
            chain.append(nxt)
        nxt = _only_user(chain[-1])
        skipped = []  # identities between the BN and the ReLU (MONAI's ADN: norm, dropout 0, act)
        while nxt is not None and nxt.op == "call_module" and _is_identity(modules.get(nxt.target)) \
                and nxt.args and nxt.args[0] is (skipped or chain)[-1]:
            skipped.append(nxt)
            nxt = _only_user(nxt)
        relu = _is_relu_node(nxt, modules) and len(nxt.args) >= 1 and nxt.args[0] is (skipped or chain)[-1]
        if relu:
            chain += skipped
        if relu:
            chain.append(nxt)
        if bn is None and not relu:
            continue
        what = _describe(bn, relu)
        args = [node.args[0], None, None, relu, converter.policy]
        cat_node = node.args[0]
        cat = _cat_inputs(cat_node) if relu else None
        with graph.inserting_before(node):
            args[1] = graph.get_attr(node.target)
            args[2] = graph.get_attr(chain[1].target) if bn is not None else None
            if cat is not None:
                skip, up, crop_of = cat
                args[0] = skip
                args += [up, crop_of]
                what = "torch.cat([skip, up], 1) + " + what + " -> conv2d_relu_concat"
            fused_node = graph.call_function(_fused_conv, tuple(args))
        chain[-1].replace_all_uses_with(fused_node)
        for victim in reversed(chain):
            graph.erase_node(victim)
        if cat is not None:
            graph.erase_node(cat_node)
        replaced.append((conv, what))
    graph.lint()
    gm.recompile()
    return replaced


def _capture_inputs(model, example_inputs):
    """module -> (args, kwargs) of its first call when model runs on example_inputs (eval,
    no_grad); {} when it fails."""
    captured = {}

    def hook(module, args, kwargs):
        captured.setdefault(module, (args, kwargs))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in model.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(*example_inputs)
    except Exception:  # noqa: BLE001 - a guessed example that the model does not take
        return {}
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return captured


def _guess_example(model):
    """An image batch that the model probably takes: its first Conv2d's input channels, 64x64
    (or the smallest valid size of a unet_ext UNet). None if there is no Conv2d."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        return None
    size = model.valid_input_size(64) if hasattr(model, "valid_input_size") else 64
    param = conv.weight
    return (torch.randn(1, conv.in_channels, size, size, device=param.device, dtype=param.dtype),)


def convert(model: nn.Module, inplace: bool = False, verbose: bool = False, report: bool = False,
            policy: str = "auto", example_inputs=None):
    """Runs `model`'s stock layers that unet_ext's kernels replace on those kernels.

    - Conv2d (stride 1, groups 1, dilation 1, zero padding) -> BatchNorm2d -> ReLU, or a conv
      with either, in an nn.Sequential or as calls in a forward that torch.fx traces
      (``F.relu(self.bn(self.conv(x)))``): one conv with bias and ReLU in its epilogue; the BN is
      folded into the weights in eval mode and runs stock in training mode. A lone Conv2d runs
      conv2d_bias. A ``torch.cat([skip, up], 1)`` (skip possibly a crop) feeding such a
      conv + ReLU runs as conv2d_relu_concat, without the concatenation, and
      ``relu(F.conv2d(x, self.weight, self.bias, padding=p))`` as conv2d_relu.
    - ConvTranspose2d(kernel 2, stride 2) -> conv_transpose2x2; MaxPool2d(2) and
      ``F.max_pool2d(x, 2)`` -> max_pool2x2.

    The model keeps its class, attributes and state_dict keys (converted modules become
    subclasses of their stock class with the same parameters; rewritten forwards call the
    model's own modules), so checkpoints load both ways. A forward is rewritten only if it
    traces with torch.fx, the same in train and eval mode, and gives the original outputs on
    `example_inputs` (default: a guessed 1 x C x 64 x 64 image); otherwise its submodules are
    tried, down to nn.Sequential runs and single modules, with a warning.
    policy="auto" runs each layer on our kernel only where `ours_is_faster` says so (else
    stock, per call); "always" uses ours wherever it can.

    Returns the converted model (a deep copy unless inplace=True); with report=True,
    (model, ConversionReport). verbose=True prints the report.
    """
    if policy not in _POLICIES:
        raise ValueError(f"convert: policy must be one of {_POLICIES}, got {policy!r}")
    if not inplace:
        model = copy.deepcopy(model)
    if example_inputs is None:
        example_inputs = _guess_example(model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    converter = _Converter(model, policy, _capture_inputs(model, example_inputs) if example_inputs else {})
    converter.swap_leaves()
    error = converter.rewrite_forwards(model, "")
    converter.report.traced = error is None
    if error is not None:
        converter.report.trace_error = error
        warnings.warn(f"unet_ext.convert: {type(model).__name__}'s forward was not rewritten with "
                      f"torch.fx ({error}); converting its modules only (its submodules' forwards "
                      "are rewritten where they trace)", stacklevel=2)
    converter.lone_convs()
    if verbose:
        print(converter.report)
    return (model, converter.report) if report else model
