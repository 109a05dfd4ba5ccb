"""Export of models on unet_ext's ops: ONNX (standard ops only) and torch.export.

Each op gets a decomposition into the stock aten ops of unet_ext.reference, registered in
torch._decomp's table when unet_ext is imported. torch.onnx's exporter decomposes every op it has
no ONNX translation for with that table, so a plain ``torch.onnx.export(model, (x,),
dynamo=True)`` writes Conv / Relu / ConvTranspose / MaxPool / Slice / Concat (and the loss as
LogSoftmax / NegativeLogLikelihoodLoss) that any ONNX runtime runs without unet_ext.
torch.export keeps our ops as they are (they are registered with fake kernels).
"""
import os

import torch
from torch._decomp import register_decomposition

from . import reference
from ._unet_shape import check_input_size, valid_input_size

__all__ = ["export_onnx", "dynamic_shapes", "example_input", "check_exportable", "main"]

_ops = torch.ops.unet_ext


@register_decomposition(_ops.conv2d_relu.default)
def _conv2d_relu(input, weight, bias, padding):
    return reference.conv2d_relu(input, weight, bias, padding)


@register_decomposition(_ops.conv2d_bias.default)
def _conv2d_bias(input, weight, bias, padding):
    return reference.conv2d_bias(input, weight, bias, padding)


@register_decomposition(_ops.conv2d_relu_concat.default)
def _conv2d_relu_concat(skip, up, weight, bias, padding):
    return reference.conv2d_relu_concat(skip, up, weight, bias, padding)


@register_decomposition(_ops.conv_transpose2x2.default)
def _conv_transpose2x2(input, weight, bias):
    return reference.conv_transpose2x2(input, weight, bias)


@register_decomposition(_ops.crop_concat.default)
def _crop_concat(skip, up):
    return reference.crop_concat(skip, up)


@register_decomposition(_ops.max_pool2x2.default)
def _max_pool2x2(input):
    return torch.nn.functional.max_pool2d(input, 2)


@register_decomposition(_ops._weighted_cross_entropy_forward.default)
def _weighted_cross_entropy_forward(logits, target, weight_map, class_weight, ignore_index, reduction,
                                    opmath_loss=False):
    # The op's three outputs: the loss (in the opmath dtype with opmath_loss, as under autocast),
    # and what its backward keeps (per-pixel logsumexp in the float32 opmath for 16-bit logits;
    # the mean's denominator). Inference graphs use the first.
    opmath = torch.float32 if logits.dtype in (torch.float16, torch.bfloat16) else logits.dtype
    loss = reference.weighted_cross_entropy(logits.to(opmath) if opmath_loss else logits, target, weight_map,
                                            class_weight, ignore_index, reduction)
    logsumexp = torch.logsumexp(logits.to(opmath), 1).reshape(logits.shape[0], -1)
    kept = target != ignore_index
    if class_weight is None:
        total = kept.sum().to(opmath)
    else:
        total = (class_weight[torch.where(kept, target, 0)] * kept).sum().to(opmath)
    return loss, logsumexp, total


# --- what the unet_ext.UNet export needs -------------------------------------------------------

def example_input(model, size=None, batch=1):
    """An input for `model` (a unet_ext.UNet): size x size (default: the smallest valid size >=
    the paper's 572 in valid mode, 256 in same mode); ValueError naming valid sizes otherwise."""
    size = size if size is not None else valid_input_size(572 if model.padding == "valid" else 256,
                                                          model.depth, model.padding)
    check_input_size(size, model.depth, model.padding)
    return torch.randn(batch, model.in_channels, size, size)


def dynamic_shapes(model, example=None):
    """Dynamic batch, height and width for a unet_ext.UNet: each of height and width is
    `multiple` * k for k >= its smallest valid value, `multiple` the largest power of two
    (<= 2**depth) that divides the smallest valid size (4 for the paper's network; 2**depth
    with same padding, where no level then needs the odd-size pad). torch.export needs the
    size as a multiple of what the graph's floor divisions divide by; sizes of that form that
    the network does not take (see unet_ext.valid_input_size) are not checked by the graph."""
    step = 2 ** model.depth
    smallest = valid_input_size(1, model.depth, model.padding) if model.padding == "valid" else step
    multiple = step
    while smallest % multiple:
        multiple //= 2
    dims = {0: torch.export.Dim("batch", min=1, max=1024)}
    for axis, name in ((2, "height"), (3, "width")):
        dims[axis] = multiple * torch.export.Dim(f"{name}_over_{multiple}", min=smallest // multiple,
                                                 max=max(smallest // multiple, 16384 // multiple))
    return (dims,)


def check_exportable(model, example):
    """One clear error for what cannot be exported: training mode and input sizes the network
    does not accept (unet_ext.UNet; with same padding, dynamic export needs multiples of
    2**depth)."""
    if model.training:
        raise ValueError("export: the model is in training mode (dropout and batch statistics would "
                         "be exported as in training); call model.eval() first")
    if hasattr(model, "depth") and hasattr(model, "padding"):
        if example.dim() != 4 or example.shape[1] != model.in_channels:
            raise ValueError(f"export: the input must be (N, {model.in_channels}, H, W), got "
                             f"{tuple(example.shape)}")
        for size in example.shape[-2:]:
            try:
                check_input_size(int(size), model.depth, model.padding)
            except ValueError as error:
                raise ValueError(f"export: {error}") from None


def export_onnx(model, path, example=None, dynamic=True, overwrite=False, opset_version=None):
    """Writes `model` (eval mode) to `path` as ONNX of standard ops, atomically (a temporary
    file renamed into place: an interrupted export leaves no partial file). For a unet_ext.UNet
    the batch, height and width are dynamic (any size the network accepts). Returns the
    torch.onnx.ONNXProgram. Needs the onnx and onnxscript packages."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    if example is None:
        example = example_input(model)
    check_exportable(model, example)
    if dynamic and getattr(model, "padding", None) == "same" and any(s % 2 ** model.depth for s in example.shape[-2:]):
        raise ValueError(f"export: with same padding the dynamic export takes sizes that are multiples of "
                         f"{2 ** model.depth}, got {tuple(example.shape[-2:])}")
    shapes = dynamic_shapes(model, example) if dynamic and hasattr(model, "depth") else None
    if shapes is not None and example.shape[0] == 1:
        example = example.expand(2, *example.shape[1:])  # a size-1 dim traces as the constant 1
    # torch.export first: torch.onnx.export's own capture does not take derived dims.
    exported = torch.export.export(model, (example,), dynamic_shapes=shapes)
    program = torch.onnx.export(exported, dynamo=True, input_names=["image"],
                                output_names=["logits"], opset_version=opset_version, verbose=False)
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp{os.getpid()}")
    try:
        program.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return program


# --- `unet-ext export CKPT -o model.onnx` -------------------------------------------------------

def build_parser(prog="unet-ext export"):
    from ._cli import Parser
    p = Parser(prog=prog, description="export a `unet-ext train` checkpoint to ONNX (standard ops, "
                                      "dynamic batch and size; runs in onnxruntime without unet_ext)")
    p.add_argument("checkpoint", help="a checkpoint written by `unet-ext train`")
    p.add_argument("-o", "--out", required=True, help="the .onnx file to write")
    p.add_argument("--size", type=int, default=None,
                   help="example input size used for tracing (default: the smallest valid size >= 572 "
                        "in valid mode, 256 in same mode); the exported model takes any valid size")
    p.add_argument("--static", action="store_true", help="fixed batch 1 and --size instead of dynamic")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return p


def main(argv=None, prog="unet-ext export"):
    from ._cli import run
    args = build_parser(prog).parse_args(argv)
    return run(prog, _export_command, args)


def _export_command(args):
    from ._cli import UsageError
    from .predict import load_model

    if os.path.exists(args.out) and not args.overwrite:
        raise UsageError(f"{args.out} exists; pass --overwrite to replace it")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise UsageError(f"the folder of {args.out} does not exist")
    model, _ = load_model(args.checkpoint)
    try:
        example = example_input(model, args.size)
        export_onnx(model, args.out, example, dynamic=not args.static, overwrite=args.overwrite)
    except ValueError as error:
        raise UsageError(str(error)) from None
    except ImportError as error:
        raise UsageError(f"ONNX export needs the onnx and onnxscript packages ({error}); "
                         "pip install onnx onnxscript") from None
    print(f"wrote {args.out} (input 'image' (N, {model.in_channels}, H, W), output 'logits'; "
          f"{'dynamic' if not args.static else 'fixed'} batch and size)")
    return 0
