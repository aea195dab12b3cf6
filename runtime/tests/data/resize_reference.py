"""Print the Pillow results that runtime/tests/preprocess.rs hard-codes for its small resize cases.

Usage:  python runtime/tests/data/resize_reference.py   (Pillow from tests/python/requirements.txt)

Every literal expected grey level in the `resize_*` tests is one of these lines; rerun this script
after changing a case. The horizontal-first line reproduces Pillow < 13.0's pass order by running the
two passes as separate resizes (the intermediate is 8-bit in both Pillow versions).
"""

from PIL import Image

CASES = [
    # (name, rows of grey levels, (width, height))
    ("upscale_two_to_four", [[0, 255]], (4, 1)),
    ("downscale_factor_three", [[0, 10, 20, 30, 40, 50, 60, 70, 80]], (3, 1)),
    ("downscale_factor_7_3_ramp", [[10, 40, 70, 100, 130, 160, 190]], (3, 1)),
    ("downscale_factor_7_3_alternating", [[0, 255, 0, 255, 0, 255, 0]], (3, 1)),
    ("column_five_to_two", [[0], [50], [100], [150], [200]], (1, 2)),
    ("row_five_to_one", [[0, 50, 100, 150, 200]], (1, 1)),
    ("dot_three_to_five", [[0, 0, 0], [0, 255, 0], [0, 0, 0]], (5, 5)),
    ("two_by_three_to_five_by_two", [[0, 200, 40], [255, 10, 90]], (2, 5)),
    ("pass_order", [[0, 37], [11, 48], [22, 59]], (5, 1)),
]


def grey(rows):
    img = Image.new("RGB", (len(rows[0]), len(rows)))
    img.putdata([(v, v, v) for row in rows for v in row])
    return img


def levels(img):
    w, h = img.size
    px = img.load()
    return [[px[x, y][0] for x in range(w)] for y in range(h)]


def main():
    print(f"Pillow {Image.__version__ if hasattr(Image, '__version__') else __import__('PIL').__version__}")
    for name, rows, size in CASES:
        print(f"{name}: {levels(grey(rows).resize(size, Image.BICUBIC))}")
    _, rows, (w, h) = CASES[-1]
    img = grey(rows)
    horizontal = img.resize((w, img.height), Image.BICUBIC).resize((w, h), Image.BICUBIC)
    print(f"pass_order_horizontal_first: {levels(horizontal)}")


if __name__ == "__main__":
    main()
