"""The streaming XLSX writer of distance matrices, read back by openpyxl (through pandas)."""
from __future__ import annotations

import numpy as np
import openpyxl
import pandas as pd
import pytest

import xlsxMatrix


def test_a_matrix_reads_back_exactly_with_its_names(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.random((5, 4)) * 10.0 ** rng.integers(-12, 12, size=(5, 4))
    values[0, 0], values[1, 1] = 0.0, 1e-300
    rows = ["a & b.png", "<c>.png", " leading space.png", "class c/img_1.2 v2.png", 'quote".png']
    columns = ["x", "y", "z", "w"]
    path = tmp_path / "m.xlsx"
    xlsxMatrix.write_matrix(path, values, rows, columns, sheet="distances")
    sheet = pd.read_excel(path, sheet_name="distances", index_col=0)
    assert list(sheet.index) == rows and list(sheet.columns) == columns
    np.testing.assert_array_equal(sheet.to_numpy(), values)  # float repr reads back to the same float64
    book = openpyxl.load_workbook(path)
    assert book.sheetnames == ["distances"] and book["distances"].dimensions == "A1:E6"


def test_fewer_digits_are_each_value_rounded_to_them_and_a_bad_count_is_refused(tmp_path):
    values = np.array([[0.0, 1.0 / 3.0], [123456.78901234567, 2.5e-12 / 7.0]])
    path = tmp_path / "m.xlsx"
    xlsxMatrix.write_matrix(path, values, ["a", "b"], ["a", "b"], digits=9)
    read = pd.read_excel(path, index_col=0).to_numpy()
    np.testing.assert_array_equal(read, [[float(format(v, ".9g")) for v in row] for row in values])
    assert read[0, 1] != values[0, 1] and read[1, 0] == 123456.789  # rounded, to 9 significant digits
    for digits in (0, 18):
        with pytest.raises(ValueError, match=f"digits {digits}: between 1 and 17"):
            xlsxMatrix.write_matrix(path, values, ["a", "b"], ["a", "b"], digits=digits)


def test_the_same_matrix_gives_the_same_bytes_and_gaps_stay_empty(tmp_path):
    values = np.array([[0.0, np.nan], [np.inf, 2.5]])
    first, second = tmp_path / "1.xlsx", tmp_path / "2.xlsx"
    xlsxMatrix.write_matrix(first, values, ["a", "b"], ["a", "b"])
    xlsxMatrix.write_matrix(second, values, ["a", "b"], ["a", "b"])
    assert first.read_bytes() == second.read_bytes()
    cells = [[c.value for c in row] for row in openpyxl.load_workbook(first).active.iter_rows()]
    assert cells == [[None, "a", "b"], ["a", 0, None], ["b", None, 2.5]]


def test_the_writer_process_writes_the_same_bytes_and_names_a_failure(tmp_path):
    values = np.random.default_rng(1).random((3, 3))
    np.save(tmp_path / "d.npy", values)
    names = ["a.png", "b & c.png", "d.png"]
    xlsxMatrix.write_matrix(tmp_path / "here.xlsx", values, names, names, sheet="distances")
    xlsxMatrix.write_matrix(tmp_path / "here9.xlsx", values, names, names, sheet="distances", digits=9)
    with xlsxMatrix.WriterProcess() as writer:
        writer.write([(tmp_path / "child.xlsx", tmp_path / "d.npy", names, "distances")])
    assert (tmp_path / "child.xlsx").read_bytes() == (tmp_path / "here.xlsx").read_bytes()
    with xlsxMatrix.WriterProcess() as writer:
        writer.write([(tmp_path / "child9.xlsx", tmp_path / "d.npy", names, "distances")], digits=9)
    assert (tmp_path / "child9.xlsx").read_bytes() == (tmp_path / "here9.xlsx").read_bytes()
    with xlsxMatrix.WriterProcess() as writer:
        with pytest.raises(RuntimeError, match="missing.npy"):
            writer.write([(tmp_path / "x.xlsx", tmp_path / "missing.npy", names, "distances")])
    with xlsxMatrix.WriterProcess() as unused:  # a block that ends before the jobs: the child is ended
        process = unused.process
    assert process.returncode is not None and not (tmp_path / "x.xlsx").exists()
