"""A streaming writer of one numeric matrix with named rows and columns as an XLSX workbook.

openpyxl builds an XML element per cell (about 30 us each): a 1,000 x 1,000 distance matrix took half a
minute per layer. Here each row is one string of `<c><v>...</v></c>` cells formatted with `digits`
significant digits (17, the default, is text that reads back to the same float64), streamed into the
zip member; names are
inline strings, so there is no shared-string table to build. The package holds only the parts Excel,
LibreOffice and openpyxl need (content types, relationships, workbook, styles, one sheet), and fixed
zip timestamps, so the same matrix always gives the same bytes.

`WriterProcess` runs the writer in a child Python process (`python xlsxMatrix.py`, its jobs as JSON on
stdin): the formatting is a second of Python at 1,000 x 1,000, which a thread would run under the
caller's GIL, slowing whatever the caller does meanwhile. The child is started ahead of its jobs, so
that its start-up (Python and numpy, a few tenths of a second) is done by the time they come.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import zipfile
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

MAX_COLUMNS = 16384     # Excel's limit; the row names take one
_MAIN = "http://schemas.openxmlformats.org/spreadsheetml/2006/main"
_REL = "http://schemas.openxmlformats.org/officeDocument/2006/relationships"
_PKG = "http://schemas.openxmlformats.org/package/2006/relationships"
_HEAD = '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>\n'
_FIXED_TIME = (1980, 1, 1, 0, 0, 0)

_STATIC_PARTS = {
    "[Content_Types].xml": (
        '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
        '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.relationships+xml"/>'
        '<Default Extension="xml" ContentType="application/xml"/>'
        '<Override PartName="/xl/workbook.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.sheet.main+xml"/>'
        '<Override PartName="/xl/worksheets/sheet1.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.worksheet+xml"/>'
        '<Override PartName="/xl/styles.xml" '
        'ContentType="application/vnd.openxmlformats-officedocument.spreadsheetml.styles+xml"/></Types>'),
    "_rels/.rels": (
        f'<Relationships xmlns="{_PKG}"><Relationship Id="rId1" Type="{_REL}/officeDocument" '
        'Target="xl/workbook.xml"/></Relationships>'),
    "xl/_rels/workbook.xml.rels": (
        f'<Relationships xmlns="{_PKG}">'
        f'<Relationship Id="rId1" Type="{_REL}/worksheet" Target="worksheets/sheet1.xml"/>'
        f'<Relationship Id="rId2" Type="{_REL}/styles" Target="styles.xml"/></Relationships>'),
    "xl/styles.xml": (
        f'<styleSheet xmlns="{_MAIN}"><fonts count="1"><font><sz val="11"/><name val="Calibri"/></font></fonts>'
        '<fills count="2"><fill><patternFill patternType="none"/></fill>'
        '<fill><patternFill patternType="gray125"/></fill></fills>'
        '<borders count="1"><border><left/><right/><top/><bottom/><diagonal/></border></borders>'
        '<cellStyleXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0"/></cellStyleXfs>'
        '<cellXfs count="1"><xf numFmtId="0" fontId="0" fillId="0" borderId="0" xfId="0"/></cellXfs>'
        '<cellStyles count="1"><cellStyle name="Normal" xfId="0" builtinId="0"/></cellStyles></styleSheet>'),
}


def _column_letters(number: int) -> str:
    """1 -> A, 27 -> AA (for the sheet's dimension)."""
    letters = ""
    while number:
        number, rest = divmod(number - 1, 26)
        letters = chr(65 + rest) + letters
    return letters


def _text(value: str) -> str:
    """An inline-string cell; spaces kept as written."""
    return f'<c t="inlineStr"><is><t xml:space="preserve">{escape(str(value))}</t></is></c>'


def _numbers(row: np.ndarray, cell: str, row_format: str) -> str:
    """One row's cells. One %-format over the row (`row_format`: the `cell` pattern once per column) is
    twice as fast as repr per value; gaps (inf, nan) are empty cells."""
    values = row.tolist()
    if all(map(math.isfinite, values)):
        return row_format % tuple(values)
    return "".join(cell % v if math.isfinite(v) else "<c/>" for v in values)


def _member(name: str, level: int) -> zipfile.ZipInfo:
    """A deflated zip member at `level`. The ZipFile's own compresslevel does not reach members opened
    from a ZipInfo: they get zlib's default (6), three times slower than 1 on this text for 10% less."""
    info = zipfile.ZipInfo(name, date_time=_FIXED_TIME)
    info.compress_type = zipfile.ZIP_DEFLATED
    setattr(info, "compress_level" if hasattr(info, "compress_level") else "_compresslevel", level)  # 3.13 renamed it
    return info


def write_matrix(path: Path, matrix: np.ndarray, row_names: list[str], column_names: list[str],
                 sheet: str = "Sheet1", compresslevel: int = 1, digits: int = 17) -> None:
    """`matrix` (rows x columns, float) with a header row of `column_names` and the `row_names` in
    column A, as pandas' `to_excel` lays out a named frame, each number with `digits` significant digits
    (17 read back to the same float64, as repr does; fewer are faster to format and deflate). Writes
    `path` directly: wrap it in an atomic write."""
    if not 1 <= digits <= 17:
        raise ValueError(f"digits {digits}: between 1 and 17")
    rows, columns = matrix.shape
    if columns + 1 > MAX_COLUMNS or len(row_names) != rows or len(column_names) != columns:
        raise ValueError(f"{rows}x{columns} matrix with {len(row_names)} row and {len(column_names)} column names")
    workbook = (f'<workbook xmlns="{_MAIN}" xmlns:r="{_REL}"><sheets>'
                f'<sheet name="{escape(sheet, {chr(34): "&quot;"})}" sheetId="1" r:id="rId1"/></sheets></workbook>')
    with zipfile.ZipFile(path, "w", compresslevel=compresslevel) as book:
        for name, text in {**_STATIC_PARTS, "xl/workbook.xml": workbook}.items():
            book.writestr(_member(name, compresslevel), _HEAD + text)
        with book.open(_member("xl/worksheets/sheet1.xml", compresslevel), "w", force_zip64=True) as stream:
            stream.write((f'{_HEAD}<worksheet xmlns="{_MAIN}"><dimension ref="A1:{_column_letters(columns + 1)}'
                          f'{rows + 1}"/><sheetData><row r="1"><c/>'
                          + "".join(map(_text, column_names)) + "</row>").encode())
            cell = f"<c><v>%.{digits}g</v></c>"
            row_format = cell * columns
            for number, (name, values) in enumerate(zip(row_names, np.asarray(matrix, dtype=np.float64)), start=2):
                stream.write(f'<row r="{number}">{_text(name)}{_numbers(values, cell, row_format)}</row>'.encode())
            stream.write(b"</sheetData></worksheet>")


class WriterProcess:
    """A child process that writes matrices stored as .npy files as workbooks (`write_matrix`), started
    now and given its jobs later; a context manager that ends the child however the block ends."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)

    def write(self, jobs: list[tuple[Path, Path, list[str], str]], digits: int = 17) -> None:
        """Writes each (workbook, matrix .npy, names of its rows and columns, sheet) with `digits`
        significant digits and waits for the child to end (a caller's thread waits without the GIL).
        Raises RuntimeError with the child's last error line when it fails."""
        _, errors = self.process.communicate(json.dumps([[str(book), str(matrix), names, sheet, digits]
                                                         for book, matrix, names, sheet in jobs]))
        if self.process.returncode:
            lines = errors.strip().splitlines() or [f"exit status {self.process.returncode}"]
            raise RuntimeError(lines[-1])

    def __enter__(self) -> "WriterProcess":
        return self

    def __exit__(self, *exception) -> None:
        if self.process.poll() is None:  # never given its jobs: the block failed before
            self.process.kill()
            self.process.communicate()


if __name__ == "__main__":
    for _book, _matrix, _names, _sheet, _digits in json.load(sys.stdin):
        write_matrix(Path(_book), np.load(_matrix, mmap_mode="r"), _names, _names, _sheet, digits=_digits)
