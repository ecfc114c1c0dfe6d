"""``bloodcell export``: a trained model as ONNX or TorchScript.

The library is imported inside the handlers (lazy imports, marked): ``bloodcell --help`` and a bad
flag answer at once, without loading torch.
"""

from __future__ import annotations

from bloodcell.config import (
    EXPORT_FORMATS,
)


def cmd_export(args) -> int:
    """bloodcell export runs/cnn4x32 --format onnx --out cnn4x32.onnx"""
    from bloodcell.inference.export import export_model  # lazy: start-up

    out = args.out or f"model.{'onnx' if args.format == 'onnx' else 'pt'}"
    s = export_model(args.checkpoint, args.format, out, quantize=args.quantize)
    meta = s["metadata"]
    check = (f"top-1 agreement with PyTorch {100 * s['agreement']:.1f} % on the calibration images"
             if s["agreement"] is not None else f"max |difference| vs PyTorch {s['max_abs_diff']:.1e}")
    print(f"wrote {s['path']} ({s['format']}{', int8' if args.quantize == 'int8' else ''}, "
          f"{s['bytes'] / 1e6:.2f} MB): {meta['model']}, {meta['image_size']} px, classes "
          f"{', '.join(meta['classes'])}; {check}")
    return 0


def add_parsers(sub) -> None:
    """Register `bloodcell export`."""
    p = sub.add_parser("export", help="export a trained model to ONNX or TorchScript",
                       description=cmd_export.__doc__)
    p.add_argument("checkpoint", help="run folder (its best.pt) or checkpoint file")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="onnx")
    p.add_argument("--out", help="output file (default model.onnx / model.pt)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none",
                   help="int8: 8-bit weights and activations (ONNX only; ONNX Runtime's static "
                        "quantisation, calibrated on the run's validation images; default none)")
    p.set_defaults(func=cmd_export)
