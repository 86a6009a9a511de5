"""The dashboard's reads: one read-only store per URL, query results cached until the store changes.

Every query runs in SQL through ``results.queries`` (values bound, never formatted into the statement); its
result is cached under the store's revision (run count, newest update, metric and grid-cell counts), so a page
re-renders from memory until a run, a metric or a grid is written, and then reads afresh.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pandas as pd
import streamlit as st

from results.store import Store, StoreError, resolve_url

PAGE_SIZE = 50
ALL = None  # the "no filter" choice of a filter box


@st.cache_resource(show_spinner=False)
def _open(url: str) -> Store:
    return Store(url, readonly=True)


@st.cache_data(show_spinner=False, max_entries=256)
def _read(_query: Callable, name: str, url: str, revision: tuple, args: tuple, kwargs: dict) -> Any:
    """``name`` stands for ``_query`` in the cache key (Streamlit cannot hash a function); ``revision`` is in
    the key so that a change to the store is a cache miss."""
    return _query(_open(url), *args, **kwargs)


@dataclass(frozen=True)
class Reader:
    """Runs ``results.queries`` functions against one store revision, through the cache."""
    store: Store
    revision: tuple

    def __call__(self, query: Callable, *args: Any, **kwargs: Any) -> Any:
        return _read(query, f"{query.__module__}.{query.__qualname__}", self.store.url, self.revision, args, kwargs)


def open_reader() -> Reader | None:
    """The store named by ``--db``/``CLIPKD_DB``; None (with the reason and what to run shown) when it has no runs."""
    url = resolve_url()
    try:
        store = _open(url)
    except StoreError as error:
        empty_state(str(error))
        return None
    revision = store.revision()
    if revision[0] == 0:
        empty_state(f"The results store {store} has no runs yet.")
        return None
    return Reader(store, revision)


def empty_state(reason: str) -> None:
    st.info(f"{reason}\n\nTo fill it, run the demo grid (`make demo`), a grid of your own "
            "(`clipkd grid submit grids/NAME.yaml`), or one run (`clipkd run CONFIG`).", icon=":material/info:")


def filter_boxes(options: dict[str, list[str]], names: tuple[str, ...], key: str) -> dict[str, str | None]:
    """One select box per filter, side by side; "all" (None) by default."""
    chosen = {}
    for column, name in zip(st.columns(len(names)), names):
        with column:
            chosen[name] = st.selectbox(name, [ALL, *options[name]], key=f"{key}_{name}",
                                        format_func=lambda v: "all" if v is ALL else v)
    return chosen


def paginate(frame: pd.DataFrame, key: str, page_size: int = PAGE_SIZE) -> pd.DataFrame:
    """The rows of the page chosen in a page box; the whole frame when it fits on one page."""
    pages = max(1, -(-len(frame) // page_size))
    if pages == 1:
        return frame
    page = page_number(pages, len(frame), key)
    return frame.iloc[(page - 1) * page_size: page * page_size]


def page_number(pages: int, rows: int, key: str) -> int:
    page = st.number_input(f"page (of {pages}; {rows} rows)", min_value=1, max_value=pages, value=1, step=1, key=key)
    return int(page)
