"""Rebuild the default calibration image set in calibration/images and its manifest.json.

A dev-time tool, not part of the package: it needs scikit-image and matplotlib, which are NOT project
dependencies. Run it from a scratch environment:

    python3 -m venv /tmp/calib-venv && /tmp/calib-venv/bin/pip install scikit-image matplotlib pillow
    /tmp/calib-venv/bin/python calibration/make_images.py

Why this mix: SmolVLM's training data is mostly documents, charts, tables and screenshots plus
captioned photos, and int8 calibration should see the activation ranges of all of them. Photos come
from the permissively licensed sample images that scikit-image and matplotlib ship (license taken from
their own docstrings / docs, recorded per image); everything else is rendered here from text written
for this file, with the DejaVu fonts matplotlib ships (Bitstream Vera license). Output is deterministic.

Each image has a role: `calibration` (quantization statistics) or `holdout` (the accuracy check
after every build). The two sets share no image, so the accuracy check never sees calibration data.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
OUT = HERE / "images"
PHOTO_MAX_SIDE = 1024  # the board upscales anyway; keeps the repository small
JPEG_QUALITY = 88

# (file stem, skimage.data function, license as the function's docstring states it, role)
SKIMAGE_PHOTOS = [
    ("astronaut", "astronaut", "public domain (NASA photograph)", "calibration"),
    ("coffee", "coffee", "CC0 (photographer Rachel Michetti)", "calibration"),
    ("chelsea", "chelsea", "CC0 (photographer Stefan van der Walt)", "calibration"),
    ("hubble_deep_field", "hubble_deep_field", "public domain (NASA/HubbleSite)", "calibration"),
    ("retina", "retina", "CC0 1.0 (Wikimedia Commons)", "calibration"),
    ("coins", "coins", "no known copyright restrictions (Brooklyn Museum collection)", "calibration"),
    ("street_sign_text", "text", "public domain (Wikipedia File:Corner.png)", "calibration"),
    ("clock_motion_blur", "clock", "public domain (photographer Stefan van der Walt)", "calibration"),
    ("microaneurysms", "microaneurysms", "CC0 (owner Andreas Maier)", "calibration"),
    ("horse_silhouette", "horse", "CC0 (openclipart, owner Andreas Preuss)", "calibration"),
    ("gravel_texture", "gravel", "CC0 (CC0Textures Gravel04)", "calibration"),
    ("rocket", "rocket", "public domain (SpaceX photograph)", "holdout"),
    ("camera", "camera", "CC0 (photographer Lav Varshney)", "holdout"),
]
MATPLOTLIB_PHOTOS = [
    ("grace_hopper", "grace_hopper.jpg", "public domain (U.S. Navy photograph)", "calibration"),
]


def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    import matplotlib

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name), size)


def _save_photo(pixels: np.ndarray, path: Path) -> None:
    if pixels.dtype == bool:
        pixels = np.where(pixels, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    image = image.convert("RGB")
    if max(image.size) > PHOTO_MAX_SIDE:
        image.thumbnail((PHOTO_MAX_SIDE, PHOTO_MAX_SIDE), Image.Resampling.LANCZOS)
    image.save(path, quality=JPEG_QUALITY, optimize=True)


def _wrap(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) > width and line:
            lines.append(line)
            line = word
        else:
            line = trial
    return lines + [line] if line else lines


PROSE = [
    "The quarterly review covers the installation of solar panels on three school buildings. Work on the "
    "north campus finished two weeks early, while the east campus was delayed by a late delivery of inverters.",
    "Energy use fell by 18 percent compared with the same period last year. Most of the saving came from the "
    "new lighting controls, which switch off corridor lights when no movement has been detected for ten minutes.",
    "Maintenance staff reported four faults, all of them minor. Two were loose connectors in the roof junction "
    "boxes, one was a failed sensor, and one was a software setting that reset after a power cut.",
    "The committee recommends extending the programme to the sports hall and the library in the next budget "
    "year, subject to a structural survey of both roofs and a review of the tender process.",
]


def render_document(path: Path, seed: int) -> None:
    """A printed report page: title, headings, justified-ish paragraphs, a footer."""
    rng = random.Random(seed)
    W, H = 1240, 1754
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    serif = seed % 2 == 0
    body = _font("DejaVuSerif.ttf" if serif else "DejaVuSans.ttf", 26)
    bold = _font("DejaVuSerif-Bold.ttf" if serif else "DejaVuSans-Bold.ttf", 30)
    d.text((110, 110), "Facilities Report " + str(2020 + seed), font=_font("DejaVuSans-Bold.ttf", 52), fill="black")
    d.line((110, 190, W - 110, 190), fill=(60, 60, 60), width=3)
    y = 230
    for section in range(6):
        d.text((110, y), f"{section + 1}. " + rng.choice(["Summary", "Progress", "Costs", "Faults", "Outlook", "Staff"]),
               font=bold, fill=(20, 20, 80))
        y += 50
        for line in _wrap(d, PROSE[(section + seed) % len(PROSE)], body, W - 220):
            d.text((110, y), line, font=body, fill=(25, 25, 25))
            y += 36
        y += 24
        if y > H - 250:
            break
    d.text((110, H - 100), f"Page {seed + 1} of 12  -  internal use only", font=_font("DejaVuSans.ttf", 20), fill="gray")
    im.save(path, optimize=True)


def render_invoice(path: Path, seed: int) -> None:
    """An invoice: letterhead, address block, an item table with ruled lines, totals."""
    rng = random.Random(seed)
    W, H = 1100, 1400
    im = Image.new("RGB", (W, H), (252, 252, 248))
    d = ImageDraw.Draw(im)
    f, fb, mono = _font("DejaVuSans.ttf", 24), _font("DejaVuSans-Bold.ttf", 26), _font("DejaVuSansMono.ttf", 24)
    d.rectangle((0, 0, W, 130), fill=(30, 90, 160))
    d.text((60, 40), "NORTHWIND SUPPLIES LTD", font=_font("DejaVuSans-Bold.ttf", 40), fill="white")
    d.text((60, 170), "INVOICE  #" + str(rng.randint(10000, 99999)), font=fb, fill="black")
    d.text((60, 210), "Date: 2024-03-" + f"{rng.randint(1, 28):02d}", font=f, fill="black")
    d.multiline_text((650, 170), "Bill to:\nHarbour View Cafe\n12 Quay Street\nPort Ellis, PE4 7QT", font=f, fill="black", spacing=8)
    items = ["Paper cups 12oz (x500)", "Coffee beans 1kg", "Oat milk 1L (x12)", "Napkins (x2000)",
             "Cleaning tablets", "Espresso machine service", "Delivery"]
    y = 380
    d.rectangle((60, y, W - 60, y + 50), fill=(225, 230, 240))
    for x, head in ((75, "Item"), (640, "Qty"), (760, "Unit"), (910, "Total")):
        d.text((x, y + 12), head, font=fb, fill="black")
    y += 50
    total = 0.0
    for item in items:
        qty, unit = rng.randint(1, 9), rng.randint(150, 9900) / 100
        total += qty * unit
        d.text((75, y + 14), item, font=f, fill="black")
        d.text((650, y + 14), str(qty), font=mono, fill="black")
        d.text((760, y + 14), f"{unit:8.2f}", font=mono, fill="black")
        d.text((900, y + 14), f"{qty * unit:9.2f}", font=mono, fill="black")
        y += 56
        d.line((60, y, W - 60, y), fill=(200, 200, 200), width=1)
    for label, value in (("Subtotal", total), ("VAT 20%", total * 0.2), ("Total due", total * 1.2)):
        y += 20
        d.text((640, y + 10), label, font=fb, fill="black")
        d.text((900, y + 10), f"{value:9.2f}", font=mono, fill="black")
        y += 36
    d.text((60, H - 120), "Payment within 30 days. Bank: 20-44-91  Account 55123987", font=f, fill=(80, 80, 80))
    im.save(path, optimize=True)


def render_table(path: Path, seed: int) -> None:
    """A spreadsheet-like grid: header row, zebra stripes, numbers and short labels."""
    rng = random.Random(seed)
    cols, rows = 7, 22
    cw, rh = 170, 44
    im = Image.new("RGB", (cols * cw + 80, rows * rh + 120), "white")
    d = ImageDraw.Draw(im)
    f, fb = _font("DejaVuSans.ttf", 20), _font("DejaVuSans-Bold.ttf", 20)
    d.text((40, 30), "Regional sales by month (units)", font=_font("DejaVuSans-Bold.ttf", 28), fill="black")
    regions = ["North", "South", "East", "West", "Central", "Coast", "Islands", "Highlands", "Valley", "Metro"]
    heads = ["Region", "Jan", "Feb", "Mar", "Apr", "May", "Total"]
    for r in range(rows):
        y = 90 + r * rh
        fill = (70, 110, 170) if r == 0 else ((240, 244, 250) if r % 2 else "white")
        d.rectangle((40, y, 40 + cols * cw, y + rh), fill=fill, outline=(190, 190, 190))
        values = [rng.randint(100, 9999) for _ in range(5)]
        cells = heads if r == 0 else [regions[r % len(regions)] + (f" {r // len(regions)}" if r >= len(regions) else "")] + \
            [f"{v:,}" for v in values] + [f"{sum(values):,}"]
        for c, text in enumerate(cells):
            d.text((52 + c * cw, y + 11), text, font=fb if r == 0 or c == 0 else f, fill="white" if r == 0 else "black")
    im.save(path, optimize=True)


def render_chart(path: Path, kind: str, seed: int) -> None:
    """A matplotlib chart (bar, line, pie or scatter) with title, axis labels and legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(10, 6.5), dpi=110)
    if kind == "bar":
        labels = ["2020", "2021", "2022", "2023", "2024"]
        x = np.arange(len(labels))
        for i, name in enumerate(["Online", "Retail", "Wholesale"]):
            ax.bar(x + i * 0.27, rng.integers(20, 100, len(labels)), width=0.27, label=name)
        ax.set_xticks(x + 0.27, labels)
        ax.set_ylabel("Revenue (million EUR)")
        ax.set_title("Revenue by channel")
    elif kind == "line":
        t = np.arange(1, 25)
        for name in ("Berlin", "Madrid", "Oslo"):
            ax.plot(t, 10 + 8 * np.sin(t / 4 + rng.uniform(0, 3)) + rng.normal(0, 1, t.size), marker="o", label=name)
        ax.set_xlabel("Month")
        ax.set_ylabel("Mean temperature (C)")
        ax.set_title("Monthly temperature, two years")
        ax.grid(alpha=0.3)
    elif kind == "pie":
        ax.pie(rng.integers(5, 40, 5), labels=["Housing", "Food", "Transport", "Leisure", "Savings"], autopct="%1.0f%%")
        ax.set_title("Household budget")
    else:
        x = rng.normal(0, 1, 300)
        ax.scatter(x, 2 * x + rng.normal(0, 1, 300), s=12, alpha=0.6, label="samples")
        ax.plot([-3, 3], [-6, 6], color="red", label="fit y = 2x")
        ax.set_xlabel("dose (mg)")
        ax.set_ylabel("response")
        ax.set_title("Dose response")
        ax.grid(alpha=0.3)
    if kind != "pie":
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    Image.open(buf).convert("RGB").save(path, optimize=True)


def render_settings_ui(path: Path, seed: int) -> None:
    """A phone settings screen: status bar, title, rows with toggles and chevrons."""
    W, H = 1080, 2200
    dark = seed % 2 == 1
    bg, fg, card = ((18, 18, 20), (235, 235, 235), (34, 34, 38)) if dark else ((242, 242, 247), (20, 20, 20), "white")
    im = Image.new("RGB", (W, H), bg)
    d = ImageDraw.Draw(im)
    f, fb = _font("DejaVuSans.ttf", 40), _font("DejaVuSans-Bold.ttf", 72)
    d.text((60, 30), "9:41", font=_font("DejaVuSans-Bold.ttf", 36), fill=fg)
    d.text((W - 220, 30), "87%", font=_font("DejaVuSans.ttf", 36), fill=fg)
    d.text((60, 140), "Settings", font=fb, fill=fg)
    rows = ["Wi-Fi", "Bluetooth", "Mobile data", "Notifications", "Sounds", "Do not disturb", "Display",
            "Wallpaper", "Battery", "Privacy", "Location", "Storage", "Accessibility", "About phone"]
    y = 300
    for i, name in enumerate(rows):
        if i % 4 == 0:
            y += 40
        d.rectangle((40, y, W - 40, y + 130), fill=card)
        d.ellipse((70, y + 35, 130, y + 95), fill=[(0, 122, 255), (52, 199, 89), (255, 149, 0), (255, 59, 48)][i % 4])
        d.text((170, y + 40), name, font=f, fill=fg)
        if i % 3 == 0:
            on = (i + seed) % 2 == 0
            d.rounded_rectangle((W - 220, y + 35, W - 90, y + 95), radius=30, fill=(52, 199, 89) if on else (120, 120, 128))
            cx = W - 125 if on else W - 185
            d.ellipse((cx - 27, y + 38, cx + 27, y + 92), fill="white")
        else:
            d.text((W - 110, y + 35), ">", font=f, fill=(150, 150, 150))
        y += 132
    im.save(path, optimize=True)


def render_code_editor(path: Path, seed: int) -> None:
    """A dark code editor screenshot: tabs, line numbers, syntax colours."""
    W, H = 1600, 1000
    im = Image.new("RGB", (W, H), (30, 30, 30))
    d = ImageDraw.Draw(im)
    mono = _font("DejaVuSansMono.ttf", 22)
    d.rectangle((0, 0, W, 44), fill=(45, 45, 48))
    for i, tab in enumerate(["main.py", "tiles.py", "README.md"]):
        d.rectangle((i * 200, 0, i * 200 + 198, 44), fill=(30, 30, 30) if i == 0 else (45, 45, 48))
        d.text((i * 200 + 20, 10), tab, font=_font("DejaVuSans.ttf", 20), fill=(220, 220, 220))
    code = [
        ("def", " split(image, tile=512):"), ("", '    """Cut an image into square tiles."""'),
        ("", "    height, width = image.shape[:2]"), ("", "    rows = math.ceil(height / tile)"),
        ("", "    cols = math.ceil(width / tile)"), ("", "    tiles = []"),
        ("for", " r in range(rows):"), ("for", "     c in range(cols):"),
        ("", "            y, x = r * tile, c * tile"), ("", "            tiles.append(image[y:y + tile, x:x + tile])"),
        ("return", " tiles"), ("", ""), ("", ""), ("class", " Cache:"),
        ("", "    def __init__(self, size: int = 128) -> None:"), ("", "        self.size = size"),
        ("", "        self.items = {}  # key -> value"), ("", ""), ("", "    def get(self, key):"),
        ("return", "         self.items.get(key)"),
    ]
    for i, (kw, rest) in enumerate(code[seed % 3:] + code[: seed % 3]):
        y = 70 + i * 36
        d.text((20, y), f"{i + 1:3d}", font=mono, fill=(110, 110, 110))
        x = 100
        if kw:
            d.text((x, y), kw, font=mono, fill=(86, 156, 214))
            x += d.textlength(kw, font=mono)
        colour = (206, 145, 120) if '"' in rest else ((106, 153, 85) if "#" in rest else (212, 212, 212))
        d.text((x, y), rest, font=mono, fill=colour)
    d.rectangle((0, H - 30, W, H), fill=(0, 122, 204))
    d.text((20, H - 27), "Ln 12, Col 31   UTF-8   Python 3.11", font=_font("DejaVuSans.ttf", 18), fill="white")
    im.save(path, optimize=True)


def render_web_page(path: Path, seed: int) -> None:
    """A desktop web page: nav bar, hero banner, a card grid with buttons."""
    rng = random.Random(seed)
    W, H = 1920, 1080
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, W, 80), fill=(33, 37, 41))
    d.text((40, 22), "trailfinder", font=_font("DejaVuSans-Bold.ttf", 34), fill="white")
    for i, item in enumerate(["Maps", "Routes", "Community", "Shop", "Sign in"]):
        d.text((W - 900 + i * 170, 28), item, font=_font("DejaVuSans.ttf", 26), fill=(220, 220, 220))
    d.rectangle((0, 80, W, 420), fill=(46, 125, 50))
    d.text((120, 170), "Find your next hike", font=_font("DejaVuSans-Bold.ttf", 64), fill="white")
    d.rounded_rectangle((120, 300, 900, 370), radius=12, fill="white")
    d.text((145, 318), "Search trails, parks or towns...", font=_font("DejaVuSans.ttf", 28), fill=(130, 130, 130))
    names = ["Ridge Loop", "Lakeside Walk", "Pine Valley", "Old Mill Trail", "Summit Path", "River Bend"]
    for i in range(4):
        x = 120 + i * 430
        d.rounded_rectangle((x, 470, x + 400, 1000), radius=16, outline=(210, 210, 210), width=2)
        d.rectangle((x + 2, 472, x + 398, 700), fill=tuple(rng.randint(60, 200) for _ in range(3)))
        d.text((x + 24, 720), names[(i + seed) % len(names)], font=_font("DejaVuSans-Bold.ttf", 32), fill="black")
        d.text((x + 24, 775), f"{rng.randint(3, 25)}.{rng.randint(0, 9)} km  -  {rng.choice(['easy', 'moderate', 'hard'])}",
               font=_font("DejaVuSans.ttf", 24), fill=(90, 90, 90))
        d.text((x + 24, 815), f"Rating {rng.randint(35, 50) / 10} ({rng.randint(20, 900)} reviews)",
               font=_font("DejaVuSans.ttf", 24), fill=(90, 90, 90))
        d.rounded_rectangle((x + 24, 900, x + 200, 960), radius=10, fill=(46, 125, 50))
        d.text((x + 58, 912), "Details", font=_font("DejaVuSans-Bold.ttf", 26), fill="white")
    im.save(path, optimize=True)


def render_slide(path: Path, seed: int) -> None:
    """A presentation slide: coloured title bar and bullet points."""
    W, H = 1600, 900
    im = Image.new("RGB", (W, H), (250, 250, 250))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 0, W, 170), fill=(120, 40, 90))
    d.text((80, 50), "Why run models on the board?", font=_font("DejaVuSans-Bold.ttf", 60), fill="white")
    bullets = ["No network needed: images never leave the device", "Predictable latency for every request",
               "Low power: the NPU draws a few watts", "One folder to copy, one command to run"]
    for i, b in enumerate(bullets):
        d.ellipse((100, 260 + i * 130, 124, 284 + i * 130), fill=(120, 40, 90))
        d.text((160, 248 + i * 130), b, font=_font("DejaVuSans.ttf", 44), fill=(30, 30, 30))
    d.text((W - 140, H - 70), str(seed + 3), font=_font("DejaVuSans.ttf", 30), fill="gray")
    im.save(path, optimize=True)


# (file stem, renderer, arguments, role, description)
RENDERED = [
    ("doc_report_serif", render_document, (0,), "calibration", "printed report page, serif body text"),
    ("doc_report_sans", render_document, (1,), "holdout", "printed report page, sans-serif body text"),
    ("doc_invoice", render_invoice, (3,), "calibration", "invoice with item table and totals"),
    ("table_sales", render_table, (4,), "calibration", "spreadsheet-style table with zebra rows"),
    ("table_sales_b", render_table, (9,), "holdout", "spreadsheet-style table, other numbers"),
    ("chart_bar", render_chart, ("bar", 5), "calibration", "grouped bar chart (matplotlib)"),
    ("chart_line", render_chart, ("line", 6), "calibration", "line chart with markers and grid (matplotlib)"),
    ("chart_pie", render_chart, ("pie", 7), "calibration", "pie chart with percentages (matplotlib)"),
    ("chart_scatter", render_chart, ("scatter", 8), "holdout", "scatter plot with fit line (matplotlib)"),
    ("ui_settings_light", render_settings_ui, (0,), "calibration", "phone settings screen, light theme"),
    ("ui_settings_dark", render_settings_ui, (1,), "holdout", "phone settings screen, dark theme"),
    ("ui_code_editor", render_code_editor, (0,), "calibration", "dark code editor screenshot"),
    ("ui_web_page", render_web_page, (2,), "calibration", "desktop web page with nav bar and cards"),
    ("slide_bullets", render_slide, (0,), "calibration", "presentation slide with bullet points"),
]


def main() -> None:
    import matplotlib
    import skimage
    from skimage import data

    OUT.mkdir(exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    entries = []
    for stem, func, license_, role in SKIMAGE_PHOTOS:
        name = f"{stem}.jpg"
        _save_photo(getattr(data, func)(), OUT / name)
        entries.append({"file": name, "role": role, "kind": "photo", "license": license_,
                        "source": f"scikit-image {skimage.__version__}, skimage.data.{func}()",
                        "made": f"RGB, longest side <= {PHOTO_MAX_SIDE}, JPEG q{JPEG_QUALITY}"})
    for stem, file, license_, role in MATPLOTLIB_PHOTOS:
        name = f"{stem}.jpg"
        _save_photo(np.asarray(Image.open(Path(matplotlib.get_data_path()) / "sample_data" / file)), OUT / name)
        entries.append({"file": name, "role": role, "kind": "photo", "license": license_,
                        "source": f"matplotlib {matplotlib.__version__}, mpl-data/sample_data/{file}",
                        "made": f"RGB, longest side <= {PHOTO_MAX_SIDE}, JPEG q{JPEG_QUALITY}"})
    for stem, render, args, role, what in RENDERED:
        name = f"{stem}.png"
        render(OUT / name, *args)
        entries.append({"file": name, "role": role, "kind": "rendered", "license": "Apache-2.0 (this project)",
                        "source": f"calibration/make_images.py {render.__name__}{args}: {what}",
                        "made": "Pillow/matplotlib with DejaVu fonts (Bitstream Vera license), PNG"})
    manifest = {
        "about": "Default calibration (int8 statistics) and hold-out (accuracy check) images for the vision "
                 "encoder. Rebuild with calibration/make_images.py; roles never share an image.",
        "images": entries,
    }
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(p.stat().st_size for p in OUT.iterdir())
    print(f"{len(entries)} images, {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
