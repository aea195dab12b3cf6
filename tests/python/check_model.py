"""Run the ONNX checker on exported graphs: check_model.py PATH [PATH...]

Each file is checked with onnx.checker.check_model(path, full_check=True), which also runs
strict shape inference and reads external data relative to the model's folder. Prints one
line per file; exits 1 with the checker's message on the first failure.
"""

import sys

import onnx
import onnx.checker


def main(paths: list[str]) -> int:
    if not paths:
        print("usage: check_model.py PATH [PATH...]", file=sys.stderr)
        return 2
    for path in paths:
        try:
            onnx.checker.check_model(path, full_check=True)
        except Exception as e:  # the checker raises several exception types
            print(f"{path}: ONNX checker (onnx {onnx.__version__}) failed: {e}", file=sys.stderr)
            return 1
        print(f"{path}: ok (onnx {onnx.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
