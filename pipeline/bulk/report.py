"""A self-contained HTML page for a teacher to review a bulk: thumbnail, question, answer and status per
line, with a filter for failures. Pictures are inlined as data URIs, so the one file works offline and
can be mailed; nothing is fetched from anywhere.

Open ``report.html#failures`` to start with only the failed lines shown.
"""

from __future__ import annotations

import base64
import html
import io
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from tuwen.pipeline.bulk.model import Bulk
from tuwen.pipeline.inputs import decode_image

THUMB_PX = 160

_CSS = """
body{font-family:"Noto Sans CJK SC","Source Han Sans SC","WenQuanYi Micro Hei","PingFang SC","Microsoft YaHei",
 sans-serif;margin:24px;color:#1f2328;background:#fff}
h1{font-size:22px;margin:0 0 4px} .meta{color:#57606a;margin:0 0 14px;font-size:14px}
.counts span{display:inline-block;margin-right:16px;font-size:15px}
.bar{margin:12px 0;display:flex;gap:8px;align-items:center;font-size:14px}
.bar button{border:1px solid #d0d7de;background:#f6f8fa;border-radius:6px;padding:5px 12px;cursor:pointer;font:inherit}
.bar button.on{background:#0969da;color:#fff;border-color:#0969da}
table{border-collapse:collapse;width:100%;font-size:14px}
th,td{border-bottom:1px solid #d8dee4;padding:6px 8px;text-align:left;vertical-align:middle}
th{background:#f6f8fa;position:sticky;top:0}
td.pic img{max-width:160px;max-height:120px;border:1px solid #d0d7de;background:#fff}
td.pic .none{display:inline-block;width:120px;height:60px;line-height:60px;text-align:center;color:#8c959f;
 border:1px dashed #d0d7de}
td.pic .src{color:#57606a;font-size:12px}
.st{font-weight:600;border-radius:10px;padding:2px 8px;white-space:nowrap}
.ok .st{background:#dafbe1;color:#1a7f37} .bad .st{background:#ffebe9;color:#cf222e}
.wait .st{background:#fff8c5;color:#7d4e00}
.err{color:#cf222e;font-size:12px} .answer{font-size:15px}
body[data-filter=failures] tr.ok, body[data-filter=failures] tr.wait{display:none}
body[data-filter=succeeded] tr.bad, body[data-filter=succeeded] tr.wait{display:none}
"""

_JS = """
function show(f){document.body.dataset.filter=f;
 document.querySelectorAll('.bar button').forEach(b=>b.classList.toggle('on',b.dataset.f===f));
 var n=0;document.querySelectorAll('tbody tr').forEach(r=>{if(getComputedStyle(r).display!=='none')n++});
 document.getElementById('shown').textContent=n;}
document.querySelectorAll('.bar button').forEach(b=>b.onclick=()=>{show(b.dataset.f);
 history.replaceState(null,'',b.dataset.f==='all'?'#':'#'+b.dataset.f)});
show(['failures','succeeded'].includes(location.hash.slice(1))?location.hash.slice(1):'all');
"""


def thumbnail(data: bytes, px: int = THUMB_PX) -> str | None:
    """A small JPEG (PNG for tiny pictures) as a data URI, or None if the bytes are not a picture."""
    try:
        img = decode_image(data, max_bytes=50 * 1024 * 1024, max_pixels=100_000_000, max_aspect_ratio=100.0)
    except Exception:  # noqa: BLE001 - a broken picture gets a placeholder, never a broken report
        return None
    img.thumbnail((px, px), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    fmt = "PNG" if img.width * img.height <= 64 * 64 else "JPEG"
    img.save(buf, format=fmt, **({"quality": 82} if fmt == "JPEG" else {}))
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "—"


def pick(lines: Iterable[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], int]:
    """At most ``limit`` lines, failures first in priority, kept in input order; and how many there were."""
    shown: list[dict[str, Any]] = []
    ok_budget: list[dict[str, Any]] = []
    total = 0
    for line in lines:
        total += 1
        if line["status"] == "failed" or line["status"] == "cancelled":
            if len(shown) < limit:
                shown.append(line)
        elif len(ok_budget) < limit:
            ok_budget.append(line)
    room = max(0, limit - len(shown))
    chosen = shown + ok_budget[:room]
    chosen.sort(key=lambda x: x["line"])
    return chosen, total


def write_report(path: Path, bulk: Bulk, lines: Iterable[dict[str, Any]], images: Any, *,
                 limit: int = 2000, title: str | None = None) -> int:
    """Write the page for ``lines`` (``BulkStore.results`` output); returns the number of rows shown."""
    rows, total = pick(lines, limit)

    def fetch(line: dict[str, Any]) -> str | None:
        key = line.get("image_key")
        if not key:
            return None
        try:
            return thumbnail(bytes(images.get(key)))
        except Exception:  # noqa: BLE001 - a missing picture gets a placeholder
            return None

    with ThreadPoolExecutor(max_workers=8) as pool:
        thumbs = list(pool.map(fetch, rows))
    counts = bulk.request_counts
    failed = sum(r["status"] in ("failed", "cancelled") for r in rows)
    e = html.escape
    with path.open("w", encoding="utf-8") as out:
        out.write(f'<!doctype html>\n<html lang="zh-CN"><head><meta charset="utf-8">'
                  f'<meta name="viewport" content="width=device-width,initial-scale=1">'
                  f"<title>{e(title or 'tuwen 批量结果 ' + bulk.id)}</title><style>{_CSS}</style></head>\n<body>\n")
        out.write(f"<h1>{e(title or '批量作业结果 · Bulk report')}</h1>\n"
                  f'<p class="meta">{e(bulk.id)} · {e(bulk.input)} · 状态 state: <b>{e(bulk.state.value)}</b>'
                  f" · 创建 created {_when(bulk.created_at)} · 完成 finished {_when(bulk.finished_at)}</p>\n"
                  f'<p class="counts"><span>总数 total <b>{counts.total}</b></span>'
                  f"<span>成功 completed <b>{counts.completed}</b></span>"
                  f"<span>失败 failed <b>{counts.failed}</b></span></p>\n")
        if len(rows) < total:
            out.write(f'<p class="meta">显示 {len(rows)} / {total} 行（失败的行优先） · showing {len(rows)} of '
                      f"{total} lines, failures first</p>\n")
        out.write('<div class="bar"><button data-f="all">全部 All</button>'
                  f'<button data-f="failures">只看失败 Failures ({failed})</button>'
                  '<button data-f="succeeded">成功 Succeeded</button>'
                  '<span>显示 shown: <b id="shown">' + str(len(rows)) + "</b></span></div>\n")
        out.write("<table><thead><tr><th>#</th><th>custom_id</th><th>图片 picture</th><th>问题 question</th>"
                  "<th>回答 answer</th><th>状态 status</th></tr></thead><tbody>\n")
        for line, thumb in zip(rows, thumbs):
            status = line["status"]
            css = "ok" if status == "succeeded" else "bad" if status in ("failed", "cancelled") else "wait"
            pic = f'<img alt="" src="{thumb}">' if thumb else '<span class="none">无图 no picture</span>'
            if line.get("file") is not None:  # a PDF's page
                page = f" · 第{line['page']}页 p. {line['page']}" if line.get("page") else ""
                pic += f'<div class="src">{e(str(line["file"]))}{page}</div>'
            err = line.get("error") or {}
            detail = (f'<div class="err">{e(str(err.get("code", "")))}: {e(str(err.get("message", "")))}</div>'
                      if err else "")
            out.write(f'<tr class="{css}"><td>{line["line"]}</td><td>{e(str(line["custom_id"]))}</td>'
                      f'<td class="pic">{pic}</td><td>{e(line.get("question") or "")}</td>'
                      f'<td class="answer">{e(line.get("answer") or "")}</td>'
                      f'<td><span class="st">{e(status)}</span>{detail}</td></tr>\n')
        out.write(f"</tbody></table>\n<script>{_JS}</script>\n</body></html>\n")
    return len(rows)
