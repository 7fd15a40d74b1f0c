"""ImageNet MobileNetV2 weights from a TensorFlow Lite file, as a stock torchvision ``mobilenet_v2``.

Students never need the insides of this module: ``helpers.models.build_model(...,
weights="imagenet")`` uses it when torchvision's weight server cannot be reached and an offline
copy of ``mobilenet_v2_1.0_224_quant.tflite`` is found. What the conversion does:

- parses the flatbuffer (the ``tflite`` package), dequantises the uint8 weights (one scale and
  zero point per tensor) and the int32 biases;
- maps the file's 53 convolutions, in operator order, onto torchvision's 52 ``Conv2d`` modules and
  the classifier (1001 outputs: output 0, "background", is dropped); OHWI -> OIHW, 1HWC -> C,1,H,W;
- puts the BatchNorm that TensorFlow folded into the convolutions back as real BatchNorm layers
  whose statistics are measured on a few hundred training images (otherwise the network collapses
  as soon as BatchNorm runs in train mode, i.e. when fine-tuning);
- uses TensorFlow's "SAME" padding on the five stride-2 3x3 convolutions (:class:`TFSamePadConv2d`,
  same state_dict keys as ``nn.Conv2d``), and records the input normalisation the weights need
  (``[-1, 1]``: mean 0.5, std 0.5) with the weights.

The result is cached as a plain torch file (state dict + metadata, loaded with
``weights_only=True``) keyed by the .tflite file's sha256 and the calibration images.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

INPUT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)  # x / 127.5 - 1: TensorFlow's [-1, 1]
INPUT_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
N_CONVOLUTIONS = 53  # torchvision mobilenet_v2's 52 Conv2d modules + the 1x1 classifier convolution
FORMAT_VERSION = 1  # of the converted file; bump when its content changes
KNOWN_SHA256 = {"7aad0c74c5e3c06e5eb3c827e13304fdd68a83da6087d92ee169c24ff9fd4776": "mobilenet_v2_1.0_224_quant.tflite"}


class TfliteWeightsError(ValueError):
    """A .tflite file that cannot be read, or that is not MobileNetV2 1.0."""


# --------------------------------------------------------------------------- TensorFlow SAME padding


class TFSamePadConv2d(nn.Conv2d):
    """A ``Conv2d`` with TensorFlow's "SAME" padding: the extra pixel goes bottom/right.

    For a stride-2 3x3 convolution on an even input size TensorFlow pads 0 pixels top/left and 1
    bottom/right; torchvision pads 1 on every side, which shifts every feature map by half a pixel.
    The parameters and state_dict keys are those of ``nn.Conv2d``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s, d in zip(x.shape[-2:], self.kernel_size, self.stride, self.dilation):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return super().forward(F.pad(x, (left, right, top, bottom)))


def _same_pad_copy(conv: nn.Conv2d) -> TFSamePadConv2d:
    new = TFSamePadConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                          padding=0, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None)
    new.weight = conv.weight  # the same Parameter objects: nothing is copied or re-initialised
    if conv.bias is not None:
        new.bias = conv.bias
    new.train(conv.training)
    return new


def use_tf_same_padding(model: nn.Module) -> nn.Module:
    """Give every strided 3x3 ``Conv2d`` of ``model`` TensorFlow's SAME padding, in place.

    The five stride-2 convolutions of MobileNetV2; the state_dict keys stay torchvision's, so
    ``model.load_state_dict(converted)`` works before or after. Returns the model.
    """
    targets = [(name, m) for name, m in model.named_modules()
               if type(m) is nn.Conv2d and m.stride != (1, 1) and m.kernel_size == (3, 3)]
    for name, conv in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, _same_pad_copy(conv))
    return model


# --------------------------------------------------------------------------- reading the flatbuffer


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tensor_array(model, graph, index: int, buffer: bytes) -> tuple[np.ndarray, float, int]:
    """(stored values, scale, zero point) of one constant tensor."""
    tensor = graph.Tensors(index)
    data = model.Buffers(tensor.Buffer()).DataAsNumpy()
    shape = tuple(int(s) for s in tensor.ShapeAsNumpy())
    dtype = {2: np.int32, 3: np.uint8, 9: np.int8}.get(tensor.Type())
    if dtype is None or isinstance(data, int) or data.size != np.prod(shape) * np.dtype(dtype).itemsize:
        raise TfliteWeightsError(f"tensor {index} ({tensor.Name().decode(errors='replace')}) has no "
                                 f"data of shape {shape}: the file is truncated or corrupt")
    quant = tensor.Quantization()
    scale = float(quant.ScaleAsNumpy()[0]) if quant is not None and quant.ScaleLength() else 1.0
    zero = int(quant.ZeroPointAsNumpy()[0]) if quant is not None and quant.ZeroPointLength() else 0
    return data.view(dtype).reshape(shape), scale, zero


def read_convolutions(path: str | Path) -> list[dict]:
    """The file's convolutions in operator order: kind, stride, float weight (TF layout) and bias.

    Raises :class:`TfliteWeightsError` for a file that is not a readable TensorFlow Lite model.
    """
    import tflite

    path = Path(path)
    buffer = path.read_bytes()
    if len(buffer) < 8 or buffer[4:8] != b"TFL3":
        raise TfliteWeightsError(f"{path} is not a TensorFlow Lite file (no 'TFL3' identifier). "
                                 "Use the mobilenet_v2_1.0_224_quant.tflite file itself; download it again "
                                 "if it was damaged (its sha256 is in helpers.tflite_weights.KNOWN_SHA256).")
    try:
        model = tflite.Model.GetRootAsModel(buffer, 0)
        graph = model.Subgraphs(0)
        codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
                 for i in range(model.OperatorCodesLength())]
        kinds = {tflite.BuiltinOperator.CONV_2D: "conv", tflite.BuiltinOperator.DEPTHWISE_CONV_2D: "depthwise"}
        ops = [graph.Operators(i) for i in range(graph.OperatorsLength())]
        convs = []
        for op in ops:
            kind = kinds.get(codes[op.OpcodeIndex()])
            if kind is None:
                continue
            options = (tflite.Conv2DOptions() if kind == "conv" else tflite.DepthwiseConv2DOptions())
            table = op.BuiltinOptions()
            options.Init(table.Bytes, table.Pos)
            w, w_scale, w_zero = _tensor_array(model, graph, op.Inputs(1), buffer)
            b, b_scale, _ = _tensor_array(model, graph, op.Inputs(2), buffer)
            convs.append(dict(kind=kind, stride=(options.StrideH(), options.StrideW()),
                              weight=(w.astype(np.float32) - w_zero) * np.float32(w_scale),
                              bias=b.astype(np.float32) * np.float32(b_scale)))
    except TfliteWeightsError:
        raise
    except Exception as error:  # a damaged flatbuffer fails anywhere with any error
        raise TfliteWeightsError(f"{path} could not be read as a TensorFlow Lite model ({type(error).__name__}: "
                                 f"{error}): truncated or corrupt? Download it again.") from error
    check_architecture([c["kind"] for c in convs], path)
    return convs


def check_architecture(kinds: list[str], path: str | Path = "the file") -> None:
    """Refuse a file whose convolutions are not those of MobileNetV2 1.0 (36 conv + 17 depthwise)."""
    n_dw = kinds.count("depthwise")
    if len(kinds) != N_CONVOLUTIONS or n_dw != 17:
        raise TfliteWeightsError(
            f"{path} has {len(kinds)} convolutions ({n_dw} depthwise); MobileNetV2 1.0 has "
            f"{N_CONVOLUTIONS} (17 depthwise). Only mobilenet_v2_1.0_224(_quant).tflite can be "
            "converted; for other architectures use weights='imagenet' with internet, or 'random'.")


# --------------------------------------------------------------------------- the torch model


def _torch_layout(conv: dict) -> torch.Tensor:
    w = torch.from_numpy(conv["weight"])
    if conv["kind"] == "depthwise":  # 1, H, W, C -> C, 1, H, W
        return w.permute(3, 0, 1, 2).contiguous()
    return w.permute(0, 3, 1, 2).contiguous()  # O, H, W, I -> O, I, H, W


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Each ``Conv2d`` of a torchvision MobileNetV2 with the BatchNorm that follows it, in order."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if len(convs) != len(norms):
        raise TfliteWeightsError(f"expected one BatchNorm per convolution, got {len(convs)} and {len(norms)}")
    return list(zip(convs, norms))


@torch.no_grad()
def folded_model(convs: list[dict]) -> nn.Module:
    """torchvision ``mobilenet_v2`` (SAME padding) holding the folded weights; BatchNorm = identity + bias."""
    model = torchvision.models.mobilenet_v2(weights=None)
    pairs = conv_bn_pairs(model)
    if len(pairs) + 1 != len(convs):
        raise TfliteWeightsError(f"{len(convs)} convolutions in the file, {len(pairs) + 1} in torchvision's model")
    for index, ((conv, bn), src) in enumerate(zip(pairs, convs)):
        weight = _torch_layout(src)
        if weight.shape != conv.weight.shape or tuple(src["stride"]) != conv.stride:
            raise TfliteWeightsError(f"convolution {index}: shape {tuple(weight.shape)} stride {src['stride']} "
                                     f"where MobileNetV2 1.0 has {tuple(conv.weight.shape)} stride {conv.stride}")
        conv.weight.copy_(weight)
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.fill_(float(np.sqrt(1.0 + bn.eps)))
        bn.bias.copy_(torch.from_numpy(src["bias"]))
    head = convs[-1]
    linear = model.classifier[-1]
    weight = _torch_layout(head)[1:, :, 0, 0]  # 1001 -> 1000: output 0 is "background"
    if weight.shape != linear.weight.shape:
        raise TfliteWeightsError(f"classifier {tuple(weight.shape)}, expected {tuple(linear.weight.shape)}")
    linear.weight.copy_(weight)
    linear.bias.copy_(torch.from_numpy(head["bias"][1:]))
    return use_tf_same_padding(model).eval()


def _batches(images: torch.Tensor | Iterable) -> Iterable[torch.Tensor]:
    if isinstance(images, torch.Tensor):
        yield from images.split(32)
        return
    for batch in images:
        yield batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def restore_batchnorm_statistics(model: nn.Module, images: torch.Tensor | Iterable) -> int:
    """Give each folded BatchNorm the mean and variance of its input on ``images``; returns the image count.

    ``images``: a tensor (N, 3, H, W) or an iterable of such batches (or of (x, y) pairs), already
    normalised as the weights need. Eval outputs do not change: running_mean = mean, running_var =
    var, weight = sqrt(var + eps), bias = folded bias + mean. Train mode then normalises by batch
    statistics close to these instead of collapsing.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums: dict[int, list[torch.Tensor]] = {i: [0.0, 0.0, 0] for i in range(len(norms))}

    def hook(index: int):
        def record(_module, inputs):
            x = inputs[0]
            var, mean = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            n = x.numel() // x.shape[1]  # per-batch moments, accumulated as float64 sums
            sums[index][0] = sums[index][0] + mean.double() * n
            sums[index][1] = sums[index][1] + (var.double() + mean.double() ** 2) * n
            sums[index][2] += n
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(norms)]
    was_training = model.training
    model.eval().to(memory_format=torch.channels_last)  # about 1.5x faster on CPU for depthwise convs
    seen = 0
    try:
        for x in _batches(images):
            model(x.to(next(model.parameters()).device, memory_format=torch.channels_last))
            seen += len(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training).to(memory_format=torch.contiguous_format)
    if sums[0][2] == 0:
        raise ValueError("restore_batchnorm_statistics got no images: pass a tensor (N, 3, H, W) or a loader")
    for i, bn in enumerate(norms):
        total, squares, count = sums[i]
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        folded_bias = bn.bias.double() - bn.running_mean.double() * bn.weight.double() / (
            bn.running_var.double() + bn.eps).sqrt()
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(folded_bias + mean)
    return seen


# --------------------------------------------------------------------------- agreement with TensorFlow


def interpreter_logits(path: str | Path, images_u8: np.ndarray) -> np.ndarray:
    """(N, 1000) logits of TensorFlow's own interpreter (``ai-edge-litert``) for (N, 224, 224, 3) uint8.

    Read before the softmax (the 1x1 classifier convolution's output, dequantised), background dropped.
    """
    import warnings

    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": that is what it is for here
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    details = {d["index"]: d for d in interpreter.get_tensor_details()}
    reshape_input = next(d for d in details.values() if d["shape"].tolist() == [1, 1, 1, 1001])
    scale, zero = reshape_input["quantization"]
    out = []
    for image in images_u8:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None].astype(np.uint8))
        interpreter.invoke()
        q = interpreter.get_tensor(reshape_input["index"]).reshape(-1).astype(np.float32)
        out.append((q - zero) * scale)
    return np.stack(out)[:, 1:]


@torch.no_grad()
def torch_logits(model: nn.Module, images_u8: np.ndarray) -> np.ndarray:
    """(N, 1000) logits of a converted model for (N, H, W, 3) uint8 images, normalised as it needs."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(getattr(model, "input_mean", INPUT_MEAN)).view(1, 3, 1, 1)
    std = torch.tensor(getattr(model, "input_std", INPUT_STD)).view(1, 3, 1, 1)
    model.eval()
    return torch.cat([model((b - mean) / std) for b in x.split(16)]).numpy()


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Mean per-image logit correlation and top-1 agreement between two (N, classes) logit arrays.

    ``top1_agreement``: same argmax; ``top1_agreement_ties``: our top class is among ``theirs``'s
    classes tied at the maximum (the interpreter's logits are 8-bit: ties happen on X-rays).
    """
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, theirs)]
    top = ours.argmax(1)
    tied = theirs[np.arange(len(top)), top] == theirs.max(1)  # 8-bit logits tie: any tied class is top-1
    return dict(logit_correlation=float(np.mean(corr)), min_logit_correlation=float(np.min(corr)),
                top1_agreement=float(np.mean(top == theirs.argmax(1))), top1_agreement_ties=float(np.mean(tied)),
                images=len(corr))


# --------------------------------------------------------------------------- conversion and cache


def _calibration_key(images, name: str | None) -> str | None:
    if name is not None:
        return name
    if images is None:
        return "none"
    if isinstance(images, torch.Tensor):
        digest = hashlib.sha256(images.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]
        return f"tensor {tuple(images.shape)} sha256 {digest}"
    return None  # a loader or generator: no key, not cached


def convert_tflite(path: str | Path, calibration_images=None, calibration_name: str | None = None,
                   agreement_images: int = 24, agreement_with=None) -> dict:
    """Convert a MobileNetV2 1.0 .tflite file into a payload dict (state dict + metadata).

    ``calibration_images``: normalised images (N, 3, H, W) or batches of them, or a callable that
    returns them, for :func:`restore_batchnorm_statistics`; ``None`` keeps the folded BatchNorm
    (exact in eval mode, collapses when fine-tuned: ``helpers.models.estimate_frozen_batchnorm``
    restores the statistics from a run's training images, and ``train.fit`` refuses to train it). When ``ai-edge-litert`` is
    installed, the agreement with TensorFlow's interpreter is measured on the first
    ``agreement_images`` calibration images (or of ``agreement_with``, normalised images or a
    callable giving them; 0: not measured) and stored with the weights.
    """
    start = time.perf_counter()
    path = Path(path)
    sha = file_sha256(path)
    model = folded_model(read_convolutions(path))
    images = calibration_images() if callable(calibration_images) else calibration_images
    n_images = 0
    if images is not None:  # else folded: exact in eval mode; restore them before fine-tuning
        n_images = restore_batchnorm_statistics(model, images)
    check_on = calibration_images if agreement_with is None else agreement_with
    measured = _measured_agreement(model, path, check_on, agreement_images) if agreement_images else None
    return dict(format=FORMAT_VERSION, arch="mobilenet_v2", state_dict=model.state_dict(),
                input_mean=INPUT_MEAN, input_std=INPUT_STD, padding="tf_same",
                source=f"tflite-converted:{path.name}", sha256=sha,
                calibration=_calibration_key(images, calibration_name) or "loader", calibration_images=n_images,
                conversion_seconds=round(time.perf_counter() - start, 2), agreement=measured)


def _measured_agreement(model: nn.Module, path: Path, calibration_images, n: int = 24) -> dict | None:
    """Agreement with TensorFlow's interpreter on the first ``n`` 224-px calibration images, when
    ``ai-edge-litert`` is installed (a dev dependency); None otherwise."""
    try:
        import ai_edge_litert.interpreter  # noqa: F401
    except ImportError:
        return None
    images = calibration_images() if callable(calibration_images) else calibration_images
    if images is None:
        return None
    first = images[:n] if isinstance(images, torch.Tensor) else next(iter(_batches(images)))[:n]
    if tuple(first.shape[-2:]) != (224, 224):  # the interpreter takes 224 px: both see the same pixels
        first = F.interpolate(first, size=(224, 224), mode="bilinear", align_corners=False)
    mean, std = torch.tensor(INPUT_MEAN).view(1, 3, 1, 1), torch.tensor(INPUT_STD).view(1, 3, 1, 1)
    u8 = ((first * std + mean) * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    model.input_mean, model.input_std = INPUT_MEAN, INPUT_STD
    result = agreement(torch_logits(model, u8), interpreter_logits(path, u8))
    return dict(result, on=f"{len(first)} images")


def default_cache_dir() -> Path:
    """Where converted files are kept: ``<torch hub dir>/converted`` (TORCH_HOME moves it)."""
    return Path(torch.hub.get_dir()) / "converted"


def cache_path(sha256: str, calibration: str, cache_dir: str | Path | None = None) -> Path:
    key = hashlib.sha256(f"{FORMAT_VERSION}|{sha256}|{calibration}".encode()).hexdigest()[:16]
    return Path(cache_dir or default_cache_dir()) / f"mobilenet_v2-tflite-{sha256[:12]}-{key}.pt"


def load_tflite_weights(path: str | Path, calibration_images=None, calibration_name: str | None = None,
                        cache_dir: str | Path | None = None, agreement_images: int = 24, agreement_with=None) -> dict:
    """The converted payload of a .tflite file: from the cache when there, else converted and cached.

    The cache file is keyed by the file's sha256 and the calibration (``calibration_name``, or a
    hash of a calibration tensor); a loader without a name is converted every time.
    """
    sha = file_sha256(path)
    key = _calibration_key(calibration_images, calibration_name)
    target = cache_path(sha, key, cache_dir) if key is not None else None
    if target is not None and target.is_file():
        payload = load_converted(target)
        if payload.get("sha256") == sha and payload.get("calibration") == key:
            payload["cache"] = "hit"
            return payload
    payload = convert_tflite(path, calibration_images, calibration_name, agreement_images, agreement_with)
    if target is not None:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        torch.save(payload, tmp)
        tmp.replace(target)
    payload["cache"] = "miss"
    return payload


def load_converted(path: str | Path) -> dict:
    """A converted file (``torch.load(..., weights_only=True)``), checked to be one."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise TfliteWeightsError(f"{path} is not a readable converted weights file ({type(error).__name__}: "
                                 f"{error}). Delete it; it is converted again from the .tflite file.") from error
    if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION or "state_dict" not in payload:
        raise TfliteWeightsError(f"{path} is not a converted weights file of format {FORMAT_VERSION} "
                                 "(helpers.tflite_weights): delete it and convert the .tflite file again.")
    return payload


def model_from_payload(payload: dict) -> nn.Module:
    """A stock torchvision ``mobilenet_v2`` with SAME padding, the converted weights and their metadata."""
    model = torchvision.models.mobilenet_v2(weights=None)
    if payload.get("padding") == "tf_same":
        use_tf_same_padding(model)
    model.load_state_dict(payload["state_dict"])
    model.input_mean = tuple(payload["input_mean"])
    model.input_std = tuple(payload["input_std"])
    return model.eval()
