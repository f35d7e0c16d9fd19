"""Synthetic Chinese primary-school worksheet pictures with questions and answers.

Two independent drawing paths:

* ``draw_training_example`` — random canvas size, aspect, background, placement and scale; every
  call draws a fresh picture. The demo model is trained on this only.
* ``draw_worksheet_example`` — a different layout (fixed 224×224 page with a frame and a header,
  objects on a grid, an unseen font): used only to measure how the model copes with pictures that
  do not come from its training generator.

Pure Pillow; no torch. Colours and shapes are named in Chinese; digits are drawn, since the machine
has no CJK font.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

SHAPES: tuple[str, ...] = ("圆形", "三角形", "正方形", "长方形", "五角星")
COLOURS: dict[str, tuple[int, int, int]] = {
    "红色": (215, 35, 35),
    "黄色": (235, 185, 0),
    "蓝色": (35, 85, 215),
    "绿色": (30, 160, 60),
    "紫色": (135, 55, 185),
    "橙色": (245, 120, 15),
}
KINDS: tuple[str, ...] = ("shape", "colour", "count", "arithmetic", "describe")
MAX_COUNT = 4

_FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")
TRAIN_FONTS = ("DejaVuSans-Bold.ttf", "DejaVuSans.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSansMono-Bold.ttf")
WORKSHEET_FONTS = ("DejaVuSansCondensed-Bold.ttf", "DejaVuSerif.ttf")

QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("图中是什么形状？", "这是什么图形？", "图里画的是什么形状？", "请说出图中图形的名称。",
              "看一看，这些图形是什么形状的？"),
    "colour": ("图形是什么颜色的？", "这是什么颜色？", "图中的图形是什么颜色？",
               "请你仔细看图，说一说图形涂的是什么颜色。"),
    "count": ("图中有几个{shape}？", "数一数，图中一共有几个图形？", "一共有多少个{shape}？",
              "请数一数这张练习题里有几个{shape}。"),
    "arithmetic": ("图中的算式等于多少？", "算一算，结果是多少？", "请计算图中的题目。",
                   "这道口算题的答案是几？"),
    "describe": ("描述这张图片。", "图中有什么？", "请描述一下这幅图。", "说说你在图里看到了什么。"),
}


@dataclass(frozen=True)
class Example:
    """One picture with a question, the reference answer and the facts an answer must contain."""

    image: Image.Image
    question: str
    answer: str
    kind: str
    facts: tuple[str, ...]
    #: Integer class labels of what is drawn (used as auxiliary targets in training).
    labels: dict[str, int] = field(default_factory=dict)
    #: Where things are drawn: ``(x0, y0, x1, y1, dense class, is an object)`` in pixels.
    marks: tuple[tuple[float, float, float, float, int, int], ...] = ()


#: Per-patch classes for dense supervision: background, the shapes, digits, then + - = and other text.
DENSE_CLASSES = ["bg", *SHAPES, *"0123456789", "+", "-", "=", "text"]


def _dense_class(ch: str) -> int:
    return DENSE_CLASSES.index(ch) if ch in DENSE_CLASSES else len(DENSE_CLASSES) - 1


def patch_labels(example: Example, grid: int) -> tuple[list[int], list[int]]:
    """Per patch of a ``grid``×``grid`` view of the picture (resized without cropping): what covers it,
    and whether an object's centre falls in it. Training targets only; the model never sees them."""
    w, h = example.image.size
    cls = [0] * (grid * grid)
    centre = [0] * (grid * grid)
    for x0, y0, x1, y1, c, is_object in example.marks:
        gx0, gx1 = int(x0 / w * grid), min(grid - 1, int(x1 / w * grid))
        gy0, gy1 = int(y0 / h * grid), min(grid - 1, int(y1 / h * grid))
        for gy in range(gy0, gy1 + 1):
            for gx in range(gx0, gx1 + 1):
                px, py = (gx + 0.5) * w / grid, (gy + 0.5) * h / grid
                if x0 <= px <= x1 and y0 <= py <= y1:
                    cls[gy * grid + gx] = c
        cx, cy = min(grid - 1, int((x0 + x1) / 2 / w * grid)), min(grid - 1, int((y0 + y1) / 2 / h * grid))
        cls[cy * grid + cx] = c
        if is_object:
            centre[cy * grid + cx] = 1
    return cls, centre


_NUMBER = re.compile(r"\d+")
_SUM = re.compile(r"(\d+)\s*([+-])\s*(\d+)\s*=\s*(\d+)")
_RESULT = re.compile(r"=\s*(\d+)")


def has_facts(answer: str, facts: tuple[str, ...]) -> bool:
    """True when the answer states every key fact and nothing that contradicts it (bounded matching).

    A substring test let "8-7=10" pass the fact "=1" and an answer naming all five shapes pass every
    shape question. Each kind of fact is matched with its bounds:

    * a shape (``圆形``) or a colour (``红色``): exactly one shape / one colour is named, and it is this one;
    * a count (``4个``): the count is the only number named;
    * a result (``=7``): the answer has exactly one ``=``, and the whole number after it is the result;
    * a sum (``8-2=6``): the answer writes exactly one sum, and it is this one.
    """
    for fact in facts:
        if fact in SHAPES:
            named = [s for s in SHAPES if s in answer]
        elif fact in COLOURS:
            named = [c for c in COLOURS if c in answer]
        elif m := re.fullmatch(r"(\d+)个", fact):
            if _NUMBER.findall(answer) != [m.group(1)] or fact not in answer:
                return False
            continue
        elif m := re.fullmatch(r"=(\d+)", fact):
            named = _RESULT.findall(answer) if answer.count("=") == 1 else []
            fact = m.group(1)
        elif m := _SUM.fullmatch(fact):
            if _SUM.findall(answer) != [m.groups()]:
                return False
            continue
        else:
            raise ValueError(f"not a key fact: {fact!r}")
        if named != [fact]:
            return False
    return True


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_FONT_DIR / name), size)


def _jitter(colour: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in colour)  # type: ignore[return-value]


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    base = rng.choice([(255, 255, 255), (250, 247, 235), (238, 238, 238), (235, 243, 252), (248, 240, 240)])
    img = Image.new("RGB", size, _jitter(base, rng, 6))
    draw = ImageDraw.Draw(img)
    style = rng.random()
    w, h = size
    line = _jitter((200, 205, 215), rng, 10)
    if style < 0.2:  # squared exercise paper
        step = rng.randint(10, 24)
        for x in range(0, w, step):
            draw.line([(x, 0), (x, h)], fill=line)
        for y in range(0, h, step):
            draw.line([(0, y), (w, y)], fill=line)
    elif style < 0.4:  # lined paper
        step = rng.randint(12, 28)
        for y in range(step, h, step):
            draw.line([(0, y), (w, y)], fill=line)
    elif style < 0.5:  # a printed frame
        m = rng.randint(2, 8)
        draw.rectangle([m, m, w - 1 - m, h - 1 - m], outline=(90, 90, 90), width=rng.randint(1, 2))
    return img


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for i in range(10):
        rad = r if i % 2 == 0 else r * 0.42
        a = rot - math.pi / 2 + i * math.pi / 5
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, float, float, float],
                fill: tuple[int, int, int], outline: tuple[int, int, int] | None, rot: float) -> None:
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, min(x1 - x0, y1 - y0) / 2
    width = 2 if outline else 0
    if shape == "圆形":
        draw.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape in ("正方形", "长方形"):
        draw.rectangle(box, fill=fill, outline=outline, width=width)
    elif shape == "三角形":
        pts = [(cx + r * math.cos(rot - math.pi / 2 + k * 2 * math.pi / 3),
                cy + r * 1.1 * math.sin(rot - math.pi / 2 + k * 2 * math.pi / 3) + r * 0.15) for k in range(3)]
        draw.polygon(pts, fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_star(cx, cy, r * 1.05, rot), fill=fill, outline=outline, width=width)


def _shape_box(shape: str, x: float, y: float, s: float, rng: random.Random) -> tuple[float, float, float, float]:
    if shape == "长方形":
        ratio = rng.uniform(1.9, 2.5)
        if rng.random() < 0.7:
            return (x, y + s * (1 - 1 / ratio) / 2, x + s, y + s * (1 + 1 / ratio) / 2)
        return (x + s * (1 - 1 / ratio) / 2, y, x + s * (1 + 1 / ratio) / 2, y + s)
    return (x, y, x + s, y + s)


def _place(rng: random.Random, n: int, size: tuple[int, int], scale: float) -> list[tuple[float, float, float]] | None:
    """Random non-overlapping squares (x, y, side) inside the canvas, or None when they do not fit."""
    w, h = size
    short = min(w, h)
    placed: list[tuple[float, float, float]] = []
    for _ in range(200):
        s = short * scale * rng.uniform(0.8, 1.15)
        margin = short * 0.04
        if s + 2 * margin >= min(w, h):
            continue
        x = rng.uniform(margin, w - s - margin)
        y = rng.uniform(margin, h - s - margin)
        gap = short * 0.05
        if all(x + s + gap < px or px + ps + gap < x or y + s + gap < py or py + ps + gap < y
               for px, py, ps in placed):
            placed.append((x, y, s))
            if len(placed) == n:
                return placed
    return None


def _finish(img: Image.Image, rng: random.Random) -> Image.Image:
    """Camera and scanner wear: blur, JPEG round trip."""
    if rng.random() < 0.15:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    if rng.random() < 0.2:
        import io

        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=rng.randint(45, 90))
        img = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    return img


def _qa_for_shapes(rng: random.Random, kind: str, shape: str, colour: str, n: int) -> tuple[str, str, tuple[str, ...]]:
    q = rng.choice(QUESTIONS[kind]).format(shape=shape)
    if kind == "shape":
        return q, f"图中是{shape}。", (shape,)
    if kind == "colour":
        return q, f"图形是{colour}的。", (colour,)
    if kind == "count":
        return q, f"图中有{n}个{shape}。", (f"{n}个",)
    return q, f"图中有{n}个{colour}的{shape}。", (f"{n}个", colour, shape)


def _qa_for_sum(rng: random.Random, kind: str, a: int, op: str, b: int) -> tuple[str, str, tuple[str, ...]]:
    r = a + b if op == "+" else a - b
    q = rng.choice(QUESTIONS[kind])
    if kind == "arithmetic":
        return q, f"{a}{op}{b}={r}。", (f"={r}",)
    return q, f"这是一道口算题：{a}{op}{b}={r}。", (f"{a}{op}{b}={r}",)


def _sum_terms(rng: random.Random) -> tuple[int, str, int]:
    op = rng.choice("+-")
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    if op == "-" and b > a:
        a, b = b, a
    return a, op, b


def _labels(**kw: int) -> dict[str, int]:
    return dict(kw)


def draw_training_example(rng: random.Random, kind: str | None = None) -> Example:
    """A freshly drawn training-distribution example; ``kind`` picks the question type."""
    kind = kind or rng.choice(KINDS)
    w = rng.randint(72, 320)
    h = int(w * rng.uniform(0.78, 1.28))
    img = _background(rng, (w, h))
    draw = ImageDraw.Draw(img)
    arithmetic = kind == "arithmetic" or (kind == "describe" and rng.random() < 0.25)
    if arithmetic:
        a, op, b = _sum_terms(rng)
        sep = rng.choice(["", "", " "])
        text = sep.join([str(a), op, str(b), "="]) + rng.choice(["?", "?", "( )", ""])
        font = _font(rng.choice(TRAIN_FONTS), max(10, int(min(w, h) * rng.uniform(0.24, 0.4))))
        tw = draw.textlength(text, font=font)
        while tw > w * 0.92:
            font = _font(font.path.split("/")[-1], int(font.size * 0.9))
            tw = draw.textlength(text, font=font)
        x = rng.uniform(w * 0.04, max(w * 0.04, w - tw - w * 0.04))
        y = rng.uniform(h * 0.05, max(h * 0.05, h - font.size * 1.3))
        ink = _jitter(rng.choice([(20, 20, 20), (30, 40, 120), (60, 60, 60), (150, 20, 20)]), rng, 10)
        marks = []
        for ch in text:  # one character at a time, so each glyph's box is known exactly
            if ch != " ":
                x0, y0, x1, y1 = draw.textbbox((x, y), ch, font=font)
                draw.text((x, y), ch, fill=ink, font=font)
                marks.append((x0, y0, x1, y1, _dense_class(ch), 0))
            x += draw.textlength(ch, font=font)
        q, ans, facts = _qa_for_sum(rng, kind, a, op, b)
        labels = _labels(scene=1, a=a, op="+-".index(op), b=b)
        return Example(_finish(img, rng), q, ans, kind, facts, labels, tuple(marks))

    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    n = rng.randint(1, MAX_COUNT)
    scale = {1: rng.uniform(0.3, 0.6), 2: rng.uniform(0.24, 0.4), 3: rng.uniform(0.2, 0.32), 4: rng.uniform(0.18, 0.28)}[n]
    spots = _place(rng, n, (w, h), scale)
    while spots is None:
        scale *= 0.85
        spots = _place(rng, n, (w, h), scale)
    fill = _jitter(COLOURS[colour], rng)
    outline = (40, 40, 40) if rng.random() < 0.3 else None
    shape_marks = []
    for x, y, s in spots:
        rot = rng.uniform(-0.25, 0.25) if shape in ("三角形", "五角星") else 0.0
        box = _shape_box(shape, x, y, s, rng)
        _draw_shape(draw, shape, box, fill, outline, rot)
        shape_marks.append((*box, _dense_class(shape), 1))
    q, ans, facts = _qa_for_shapes(rng, kind, shape, colour, n)
    labels = _labels(scene=0, shape=SHAPES.index(shape), colour=list(COLOURS).index(colour), count=n - 1)
    return Example(_finish(img, rng), q, ans, kind, facts, labels, tuple(shape_marks))


def draw_worksheet_example(rng: random.Random, kind: str) -> Example:
    """A 224×224 worksheet page drawn by a separate layout path: frame, header bar, grid cells."""
    w = h = 224
    img = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle([6, 6, w - 7, h - 7], outline=(0, 0, 0), width=2)
    draw.rectangle([16, 16, w - 17, 36], fill=(225, 225, 225))
    body = (16, 48, w - 16, h - 16)
    arithmetic = kind == "arithmetic" or (kind == "describe" and rng.random() < 0.25)
    if arithmetic:
        a, op, b = _sum_terms(rng)
        font = _font(rng.choice(WORKSHEET_FONTS), 44)
        text = f"{a} {op} {b} ="
        tw = draw.textlength(text, font=font)
        x = (w - tw) / 2
        y = rng.choice([70, 110, 140])
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
        q, ans, facts = _qa_for_sum(rng, kind, a, op, b)
        return Example(img, q, ans, kind, facts)
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    n = rng.randint(1, MAX_COUNT)
    cols = 2 if n > 1 else 1
    rows = (n + cols - 1) // cols
    cw, ch = (body[2] - body[0]) / cols, (body[3] - body[1]) / rows
    s = min(cw, ch) * 0.62
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    for c, r in cells[:n]:
        x = body[0] + c * cw + (cw - s) / 2
        y = body[1] + r * ch + (ch - s) / 2
        _draw_shape(draw, shape, _shape_box(shape, x, y, s, rng), COLOURS[colour], (0, 0, 0), 0.0)
    q, ans, facts = _qa_for_shapes(rng, kind, shape, colour, n)
    return Example(img, q, ans, kind, facts)


def held_out_set(seed: int, per_kind: int, style: str = "training") -> list[Example]:
    """``per_kind`` examples of every question type, drawn from ``seed`` (never a training seed)."""
    rng = random.Random(seed)
    draw = draw_training_example if style == "training" else draw_worksheet_example
    return [draw(rng, kind) for kind in KINDS for _ in range(per_kind)]
