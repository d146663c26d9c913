"""Where a search's Optuna study lives: a sqlite file in the search folder, or a team's database.

`--optuna-storage URL` takes any SQLAlchemy URL Optuna's RDBStorage opens (PostgreSQL for a team:
``postgresql+psycopg://USER@HOST:5432/optuna``). A password in the URL is never written by us:
printed lines, summary.json and MLflow show it masked, search.json keeps the URL without it, so
a resumed search finds the password where libpq looks (PGPASSWORD, ~/.pgpass) or in a URL given
again.
"""
from __future__ import annotations

from pathlib import Path

from lsep_tune.errors import InputError

EXPECTED = "expected an SQLAlchemy database URL such as postgresql+psycopg://USER@HOST:5432/DATABASE"


def default_storage(output: Path) -> str:
    return f"sqlite:///{(Path(output) / 'optuna.db').resolve()}"


def _url(url: str):
    from sqlalchemy.engine import make_url

    return make_url(url)


def masked(url: str) -> str:
    """The URL as it may be shown: its password, if any, as ***."""
    try:
        return _url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing in it can be told from a password
        return url if "@" not in url else "<not shown: " + url.rsplit("@", 1)[-1] + ">"


def without_password(url: str) -> str:
    """The URL as it may be stored: the same database, no password (libpq finds it elsewhere)."""
    return _url(url)._replace(password=None).render_as_string(hide_password=False)  # set() keeps a None


def open_storage(url: str):
    """Optuna's RDBStorage for `url`. A server's connections are checked before use (pool_pre_ping),
    so a search that waits hours between trials survives the database dropping idle connections or
    restarting. No Optuna heartbeat: Ray's searcher asks and tells from the driver, which heartbeats
    never cover, and Tune's --resume is what ends a dead driver's trials."""
    import optuna

    kwargs = {} if _url(url).get_backend_name() == "sqlite" else {"engine_kwargs": {"pool_pre_ping": True}}
    return optuna.storages.RDBStorage(url, **kwargs)


def check_storage(url: str, timeout_s: int = 5) -> str | None:
    """None when the study's database can be used, else what is wrong, naming no password: the URL
    parses, its driver imports, and a server answers one connection (a few ms), so a typo or a wrong
    password is refused before Ray starts rather than after the first trial."""
    from sqlalchemy import create_engine
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
    from sqlalchemy.pool import NullPool

    try:
        parsed = _url(url)
        dialect = parsed.get_dialect()
    except (ArgumentError, NoSuchModuleError, ValueError):
        return EXPECTED
    try:
        dialect.import_dbapi()
    except ImportError as err:
        return (f"its driver {parsed.get_driver_name()} is not installed ({err}); "
                "postgresql+psycopg:// uses psycopg, which lsep_tune installs")
    if parsed.get_backend_name() == "sqlite":  # a file: connecting would create it, before any output
        folder = Path(parsed.database or ".").resolve().parent
        return None if folder.is_dir() else f"expected an existing folder for the sqlite file, {folder}"
    connect_args = {"connect_timeout": timeout_s} if parsed.get_backend_name() == "postgresql" else {}
    try:
        engine = create_engine(parsed, poolclass=NullPool, connect_args=connect_args)
        with engine.connect():
            pass
    except SQLAlchemyError as err:
        cause = getattr(err, "orig", None) or err
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if parsed.password:
            first = first.replace(str(parsed.password), "***")
        return f"cannot open the database ({first})"
    return None


def resolve_storage(given: str | None, output: Path, remembered: str | None) -> str | None:
    """The study's URL for a new or resumed search (None: the default sqlite file in `output`).
    A resumed search keeps the study it started with: another database holds none of its trials."""
    elsewhere = remembered if remembered and remembered != default_storage(output) else None
    url = given or elsewhere
    if url:
        problem = check_storage(url)
        if problem:
            raise InputError("optuna_storage", masked(url), problem)
    if given and remembered and without_password(given) != without_password(remembered):
        raise InputError("optuna_storage", masked(given), f"expected the resumed search's study storage, {remembered}")
    return url
