"""Convert TensorFlow Lite's ImageNet MobileNetV2 into an ordinary torchvision weights file.

    uv run python tools/convert_tflite_weights.py [--tflite PATH] [--out data/weights/mobilenet_v2_imagenet.pt]
                                                  [--calibration-dir FOLDER]

A development tool for machines where torchvision's weight server cannot be reached (the course's
own ones: ../shared/weights holds ``mobilenet_v2_1.0_224_quant.tflite``, Apache 2.0). The output is a
``torch.save``'d dict that loads with ``torch.load(weights_only=True)``::

    {"arch": "mobilenet_v2", "state_dict": <stock torchvision mobilenet_v2 keys, 1000 classes>,
     "normalization": {"mean": (0.5,) * 3, "std": (0.5,) * 3}, "padding": "tf_same",
     "info": {"source", "sha256" (of the .tflite), "calibration", "calibration_images", "batchnorm", "agreement"}}

``helpers.models.build_model(..., weights="imagenet")`` finds it (``$COURSE_WEIGHTS_DIR``,
``data/weights/``, ``../shared/weights``) when torchvision's own weights cannot be downloaded.
What the conversion does (facts measured in ../shared/weights/README.md):

- dequantises the file's 53 convolutions (uint8 weights, int32 biases; the ``tflite`` package parses
  the flatbuffer) and maps them, in operator order, onto torchvision's 52 ``Conv2d`` modules and the
  classifier (1001 outputs: output 0, "background", is dropped); OHWI -> OIHW, 1HWC -> C,1,H,W;
- puts back the BatchNorm that TensorFlow folded into the convolutions, with the per-channel mean and
  variance measured on a few hundred calibration images (eval outputs unchanged; without them
  fine-tuning in train mode collapses);
- records TensorFlow's "SAME" padding of the five stride-2 convolutions and the [-1, 1] input;
- measures the agreement with TensorFlow's own interpreter (``ai-edge-litert``, a dev dependency).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python tools/convert_tflite_weights.py` from a plain checkout
    sys.path.insert(0, str(ROOT))

from helpers.models import OFFLINE_FILES, TFLITE_FILES, use_tf_same_padding  # noqa: E402

SHARED = ROOT.parent / "shared"
DEFAULT_TFLITE = SHARED / "weights" / TFLITE_FILES["mobilenet_v2"]
DEFAULT_OUT = ROOT / "data" / "weights" / OFFLINE_FILES["mobilenet_v2"]
DEFAULT_CALIBRATION = SHARED / "data" / "chest_xray_pneumonia_224" / "train"
INPUT_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)  # x / 127.5 - 1: TensorFlow's [-1, 1]
INPUT_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)
N_CONVOLUTIONS = 53  # torchvision mobilenet_v2's 52 Conv2d modules + the 1x1 classifier convolution
CALIBRATION_IMAGES = 300  # BatchNorm statistics from this many images (balanced over class folders)
CALIBRATION_SIZES = (128, 160, 224)  # px: the cpu profile's, README's measurements', the full profile's
AGREEMENT_IMAGES = 24  # checked against the interpreter at its 224 px
NATURAL_SAMPLES = ("astronaut", "brick", "camera", "chelsea", "coffee", "coins", "colorwheel", "grass", "gravel",
                   "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
                   "rocket", "text", "clock", "cell")


class TfliteWeightsError(ValueError):
    """A .tflite file that cannot be read, or that is not MobileNetV2 1.0."""


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- reading the flatbuffer


def _tensor_array(model, graph, index: int) -> tuple[np.ndarray, float, int]:
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
    """The file's convolutions in operator order: kind, stride, float weight (TF layout) and bias."""
    import tflite

    path = Path(path)
    buffer = path.read_bytes()
    if len(buffer) < 8 or buffer[4:8] != b"TFL3":
        raise TfliteWeightsError(f"{path} is not a TensorFlow Lite file (no 'TFL3' identifier). Use "
                                 "mobilenet_v2_1.0_224_quant.tflite itself; download it again if it was damaged.")
    try:
        model = tflite.Model.GetRootAsModel(buffer, 0)
        graph = model.Subgraphs(0)
        codes = [max(model.OperatorCodes(i).BuiltinCode(), model.OperatorCodes(i).DeprecatedBuiltinCode())
                 for i in range(model.OperatorCodesLength())]
        kinds = {tflite.BuiltinOperator.CONV_2D: "conv", tflite.BuiltinOperator.DEPTHWISE_CONV_2D: "depthwise"}
        convs = []
        for op in (graph.Operators(i) for i in range(graph.OperatorsLength())):
            kind = kinds.get(codes[op.OpcodeIndex()])
            if kind is None:
                continue
            options = tflite.Conv2DOptions() if kind == "conv" else tflite.DepthwiseConv2DOptions()
            table = op.BuiltinOptions()
            options.Init(table.Bytes, table.Pos)
            w, w_scale, w_zero = _tensor_array(model, graph, op.Inputs(1))
            b, b_scale, _ = _tensor_array(model, graph, op.Inputs(2))
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
            f"{N_CONVOLUTIONS} (17 depthwise). Only mobilenet_v2_1.0_224(_quant).tflite can be converted.")


# --------------------------------------------------------------------------- the torch model


def _torch_layout(conv: dict) -> torch.Tensor:
    w = torch.from_numpy(conv["weight"])
    if conv["kind"] == "depthwise":  # 1, H, W, C -> C, 1, H, W
        return w.permute(3, 0, 1, 2).contiguous()
    return w.permute(0, 3, 1, 2).contiguous()  # O, H, W, I -> O, I, H, W


@torch.no_grad()
def folded_model(convs: list[dict]) -> nn.Module:
    """torchvision ``mobilenet_v2`` (SAME padding) holding the folded weights; BatchNorm = identity + bias."""
    model = torchvision.models.mobilenet_v2(weights=None)
    pairs = list(zip([m for m in model.modules() if isinstance(m, nn.Conv2d)],
                     [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]))
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
    linear = model.classifier[-1]
    weight = _torch_layout(convs[-1])[1:, :, 0, 0]  # 1001 -> 1000: output 0 is "background"
    if weight.shape != linear.weight.shape:
        raise TfliteWeightsError(f"classifier {tuple(weight.shape)}, expected {tuple(linear.weight.shape)}")
    linear.weight.copy_(weight)
    linear.bias.copy_(torch.from_numpy(convs[-1]["bias"][1:]))
    return use_tf_same_padding(model).eval()


@torch.no_grad()
def restore_batchnorm_statistics(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Give each folded BatchNorm the mean and variance of its input on ``batches``; returns the image count.

    ``batches``: tensors (N, 3, H, W) normalised as the weights need. Eval outputs do not change:
    running_mean = mean, running_var = var, weight = sqrt(var + eps), bias = folded bias + mean.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    sums = [[0.0, 0.0, 0] for _ in norms]

    def hook(index: int):
        def record(_module, inputs):
            x = inputs[0].double()
            n = x.numel() // x.shape[1]
            sums[index][0] = sums[index][0] + x.sum(dim=(0, 2, 3))
            sums[index][1] = sums[index][1] + (x * x).sum(dim=(0, 2, 3))
            sums[index][2] += n
        return record

    handles = [m.register_forward_pre_hook(hook(i)) for i, m in enumerate(norms)]
    seen = 0
    try:
        model.eval()
        for x in batches:
            model(x)
            seen += len(x)
    finally:
        for handle in handles:
            handle.remove()
    if seen == 0:
        raise ValueError("no calibration images: give --calibration-dir a folder of images")
    for (total, squares, count), bn in zip(sums, norms):
        mean = total / count
        var = (squares / count - mean * mean).clamp_min(0.0)
        folded_bias = bn.bias.double() - bn.running_mean.double() * bn.weight.double() / (
            bn.running_var.double() + bn.eps).sqrt()
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_((var + bn.eps).sqrt())
        bn.bias.copy_(folded_bias + mean)
    return seen


# --------------------------------------------------------------------------- images


def _u8_rgb(image, size: int) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.asarray(Image.fromarray(array[..., :3]).resize((size, size), Image.BILINEAR))


def natural_images(size: int = 224, names: tuple[str, ...] = NATURAL_SAMPLES) -> np.ndarray:
    """(N, size, size, 3) uint8: scikit-image's bundled sample photos (a dev dependency), squashed."""
    from skimage import data

    return np.stack([_u8_rgb(getattr(data, name)(), size) for name in names])


def image_files(folder: str | Path, n: int) -> list[Path]:
    """Up to ``n`` images of ``folder``, evenly spaced in file order, balanced over its class folders."""
    folder = Path(folder)
    groups = [sorted(p for p in d.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
              for d in sorted(p for p in folder.iterdir() if p.is_dir())] or [
        sorted(p for p in folder.glob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})]
    per_group = max(n // len(groups), 1)
    return [f for files in groups for f in files[::max(len(files) // per_group, 1)][:per_group]]


def read_images(files: list[Path], size: int) -> np.ndarray:
    """(N, size, size, 3) uint8, squashed to a square as the course's loaders do."""
    return np.stack([_u8_rgb(Image.open(f).convert("RGB"), size) for f in files])


def normalised(images_u8: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) uint8 -> (N, 3, H, W) float in [-1, 1], the weights' normalisation."""
    x = torch.from_numpy(np.ascontiguousarray(images_u8)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(INPUT_MEAN).view(1, 3, 1, 1)) / torch.tensor(INPUT_STD).view(1, 3, 1, 1)


# --------------------------------------------------------------------------- agreement with TensorFlow


def interpreter_logits(path: str | Path, images_u8: np.ndarray) -> np.ndarray:
    """(N, 1000) logits of TensorFlow's own interpreter (``ai-edge-litert``) for (N, 224, 224, 3) uint8.

    Read before the softmax (the classifier convolution's output, dequantised), background dropped.
    """
    from ai_edge_litert.interpreter import Interpreter

    with warnings.catch_warnings():  # "preserve_all_tensors is for debugging": that is what it is for here
        warnings.simplefilter("ignore", UserWarning)
        interpreter = Interpreter(model_path=str(path), experimental_preserve_all_tensors=True)
    interpreter.allocate_tensors()
    logits = next(d for d in interpreter.get_tensor_details() if d["shape"].tolist() == [1, 1, 1, 1001])
    scale, zero = logits["quantization"]
    out = []
    for image in images_u8:
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], image[None].astype(np.uint8))
        interpreter.invoke()
        out.append((interpreter.get_tensor(logits["index"]).reshape(-1).astype(np.float32) - zero) * scale)
    return np.stack(out)[:, 1:]


@torch.no_grad()
def torch_logits(model: nn.Module, images_u8: np.ndarray) -> np.ndarray:
    """(N, 1000) logits of a converted model (ImageNet head) for (N, H, W, 3) uint8 images."""
    model.eval()
    return torch.cat([model(b) for b in normalised(images_u8).split(16)]).numpy()


def agreement(ours: np.ndarray, theirs: np.ndarray) -> dict:
    """Mean per-image logit correlation and top-1 agreement between two (N, classes) logit arrays.

    ``top1_agreement_ties``: our top class is among the interpreter's classes tied at its maximum
    (its logits are 8-bit: ties happen on X-rays).
    """
    corr = [float(np.corrcoef(a, b)[0, 1]) for a, b in zip(ours, theirs)]
    top = ours.argmax(1)
    tied = theirs[np.arange(len(top)), top] == theirs.max(1)
    return dict(logit_correlation=float(np.mean(corr)), min_logit_correlation=float(np.min(corr)),
                top1_agreement=float(np.mean(top == theirs.argmax(1))), top1_agreement_ties=float(np.mean(tied)),
                images=len(corr))


# --------------------------------------------------------------------------- the conversion


def _agreement_images(calibration_files: list[Path]) -> tuple[np.ndarray, str] | tuple[None, None]:
    """224-px images to check against the interpreter: calibration images, else scikit-image's photos."""
    if calibration_files:
        step = max(len(calibration_files) // AGREEMENT_IMAGES, 1)
        files = calibration_files[::step][:AGREEMENT_IMAGES]
        return read_images(files, 224), f"{len(files)} calibration images at 224 px"
    try:
        return natural_images(224), f"{len(NATURAL_SAMPLES)} scikit-image sample photos at 224 px"
    except ImportError:
        return None, None


def convert(tflite: str | Path = DEFAULT_TFLITE, out: str | Path = DEFAULT_OUT,
            calibration_dir: str | Path | None = None, n_images: int = CALIBRATION_IMAGES,
            sizes: tuple[int, ...] = CALIBRATION_SIZES, check: bool = True) -> dict:
    """Convert ``tflite`` and write the weights file ``out``; returns its ``info``.

    ``calibration_dir`` (default: the pneumonia training X-rays of ../shared/data when present, else
    scikit-image's sample photos) gives the BatchNorm statistics; ``check`` measures the agreement
    with TensorFlow's interpreter when ``ai-edge-litert`` is installed.
    """
    start = time.perf_counter()
    tflite = Path(tflite)
    folder = Path(calibration_dir) if calibration_dir else (DEFAULT_CALIBRATION if DEFAULT_CALIBRATION.is_dir() else None)
    model = folded_model(read_convolutions(tflite))
    files = image_files(folder, n_images) if folder is not None else []
    what = f"{folder.parent.name}/{folder.name}" if folder is not None else "scikit-image sample photos"

    def batches():  # image i at sizes[i % len(sizes)]: statistics that suit every profile's size
        for k, size in enumerate(sizes):
            pixels = read_images(files[k::len(sizes)], size) if files else natural_images(size)[k::len(sizes)]
            yield from normalised(pixels).split(32)

    seen = restore_batchnorm_statistics(model, batches())
    calibration = f"{seen} images of {what}, at {'/'.join(map(str, sizes))} px"
    measured = None
    if check:
        try:
            import ai_edge_litert.interpreter  # noqa: F401
        except ImportError:
            print("ai-edge-litert is not installed (uv sync installs the dev group): agreement not measured.")
        else:
            u8, on = _agreement_images(files)
            if u8 is not None:
                measured = dict(agreement(torch_logits(model, u8), interpreter_logits(tflite, u8)), on=on)
    info = dict(source=f"tflite-converted:{tflite.name}", sha256=file_sha256(tflite),
                calibration=calibration, calibration_images=seen,
                batchnorm=f"restored from {seen} calibration images", agreement=measured,
                converted_by="tools/convert_tflite_weights.py", torch_version=str(torch.__version__),
                conversion_seconds=round(time.perf_counter() - start, 1))
    payload = dict(arch="mobilenet_v2", state_dict=model.state_dict(),
                   normalization=dict(mean=INPUT_MEAN, std=INPUT_STD), padding="tf_same", info=info)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(out)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tflite", type=Path, default=DEFAULT_TFLITE, help=f"default: {DEFAULT_TFLITE}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default: {DEFAULT_OUT}")
    parser.add_argument("--calibration-dir", type=Path, default=None,
                        help=f"images for the BatchNorm statistics (default: {DEFAULT_CALIBRATION} if present)")
    parser.add_argument("--calibration-images", type=int, default=CALIBRATION_IMAGES)
    parser.add_argument("--no-check", action="store_true", help="skip the check against TensorFlow's interpreter")
    args = parser.parse_args(argv)
    if not args.tflite.is_file():
        parser.error(f"{args.tflite} does not exist")
    try:
        info = convert(args.tflite, args.out, args.calibration_dir, args.calibration_images, check=not args.no_check)
    except TfliteWeightsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {info['calibration']}; agreement with TensorFlow's interpreter: "
          f"{info['agreement'] or 'not measured'} ({info['conversion_seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
