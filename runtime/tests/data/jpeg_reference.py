"""Make the Pillow reference for the JPEG-input test in runtime/tests/preprocess.rs.

Usage:
    mkdir -p /tmp/jpeg && CARROT_DUMP_JPEG=/tmp/jpeg \
        cargo test -p carrot-runtime --test preprocess jpeg_input
    python runtime/tests/data/jpeg_reference.py /tmp/jpeg/chelsea_q90.jpg

The test encodes fixtures/images/chelsea.png as a quality-90 JPEG with the `image` crate and
dumps it; this script decodes that file with Pillow (libjpeg-turbo), pads it to a square with
(127, 127, 127) and resizes it to 60x60 with BICUBIC, as the reference pipeline does, then writes
the 8-bit result next to this script and prints the JPEG's SHA-256 for CHELSEA_Q90_SHA256.
"""

import hashlib
import sys
from pathlib import Path

from PIL import Image


def expand2square(img, color):
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), color)
    out.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return out


def main():
    jpeg = Path(sys.argv[1])
    img = Image.open(jpeg).convert("RGB")
    ref = expand2square(img, (127, 127, 127)).resize((60, 60), Image.BICUBIC)
    out = Path(__file__).with_name("chelsea_q90.pillow60.png")
    ref.save(out)
    print("sha256", hashlib.sha256(jpeg.read_bytes()).hexdigest())
    print("wrote", out, "with Pillow", Image.__version__)


if __name__ == "__main__":
    main()
