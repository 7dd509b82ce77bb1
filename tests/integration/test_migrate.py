import shutil

import psycopg
import pytest

from feeds.migrate import MigrationError, apply

from conftest import ROOT


def test_migrations_apply_in_order_and_rerun_is_noop(pg, tmp_path):
    dsn = pg.dsn(pg.create_db())
    first = apply(dsn, ROOT / "sql")
    assert first == sorted(first) and first[0].startswith("0001_") and len(first) >= 2
    assert apply(dsn, ROOT / "sql") == []
    with psycopg.connect(dsn) as c:
        rows = c.execute("SELECT version, checksum FROM schema_migrations ORDER BY version").fetchall()
    assert [r[0] for r in rows] == [n[:4] for n in first]
    assert all(len(r[1]) == 64 for r in rows)


def test_changed_applied_migration_is_refused(pg, tmp_path):
    dsn = pg.dsn(pg.create_db())
    sql = tmp_path / "sql"
    shutil.copytree(ROOT / "sql", sql)
    apply(dsn, sql)
    f = sorted(sql.glob("0002_*.sql"))[0]
    f.write_text(f.read_text() + "\n-- edited\n")
    with pytest.raises(MigrationError, match="0002_.*checksum"):
        apply(dsn, sql)


def test_failing_migration_rolls_back_and_is_not_recorded(pg, tmp_path):
    dsn = pg.dsn(pg.create_db())
    sql = tmp_path / "sql"
    shutil.copytree(ROOT / "sql", sql)
    (sql / "0999_broken.sql").write_text("CREATE TABLE half_done (x int);\nSELECT no_such_function();\n")
    with pytest.raises(MigrationError, match="0999_broken"):
        apply(dsn, sql)
    with psycopg.connect(dsn) as c:
        assert c.execute("SELECT to_regclass('half_done')").fetchone()[0] is None
        assert c.execute("SELECT count(*) FROM schema_migrations WHERE version = '0999'").fetchone()[0] == 0


def test_bad_file_name_is_refused(tmp_path):
    (tmp_path / "1_x.sql").write_text("select 1")
    with pytest.raises(MigrationError, match="0001_name.sql"):
        apply("host=invalid", tmp_path)
