#!/usr/bin/env python3
"""Generate the demo origin folder for `stack pull` (see README.md beside this file).

Writes, next to this script:

    api/data/<table_id>/download        parquet tables (a file literally named `download`)
    api/data/tbl_orders/v2/download     the changed `orders` table of manifest-v2.json
    api/memory/finance/bundle.md        the `finance` memory bundle
    manifest.json, manifest-v2.json     manifests carrying the real md5s and sizes

Everything is fixed data: the same pyarrow version writes the same bytes every time
(no generation timestamps; the only version-dependent bytes are parquet's `created_by`
string). Run `python3 generate.py --check` to compare the committed files with what
this script would write, without writing anything.

Requires Python 3.11+ and pyarrow (`pip install pyarrow`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import random
import sys
from decimal import Decimal
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent

# Parquet writer options, all explicit so that a pyarrow upgrade changing a default
# does not silently change the bytes.
WRITE_OPTIONS = dict(
    version="2.6",
    data_page_version="1.0",
    compression="snappy",
    use_dictionary=True,
    write_statistics=True,
    write_page_index=False,
    store_schema=True,
)

MONEY = pa.decimal128(12, 2)

COUNTRIES = ["DE", "FR", "GB", "NL", "US", "CH"]
CURRENCY_OF = {"DE": "EUR", "FR": "EUR", "NL": "EUR", "GB": "GBP", "US": "USD", "CH": "CHF"}
SEGMENTS = ["enterprise", "mid-market", "smb"]
FIRST = ["Acme", "Borealis", "Cobalt", "Delta", "Elm", "Fjord", "Granite", "Harbor",
         "Iris", "Juniper", "Kestrel", "Lumen", "Meridian", "Nimbus", "Orchid", "Pioneer"]
LAST = ["Analytics", "Foods", "Logistics", "Systems", "Textiles", "Robotics", "Energy",
        "Retail", "Labs", "Holdings"]
STATUSES = ["paid", "paid", "paid", "shipped", "refunded", "cancelled"]
CHANNELS = ["email", "search", "social", "events", "partner"]


class Rng:
    """Deterministic choices built only on `random.Random.random()`, whose sequence
    Python guarantees to stay the same across versions for a given integer seed."""

    def __init__(self, seed: int) -> None:
        self._r = random.Random(seed)

    def below(self, n: int) -> int:
        return min(int(self._r.random() * n), n - 1)

    def pick(self, items: list):
        return items[self.below(len(items))]

    def cents(self, lo: int, hi: int) -> Decimal:
        """A money amount between lo and hi (whole units), two decimals."""
        return Decimal(lo * 100 + self.below((hi - lo) * 100)).scaleb(-2)


def parquet_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **WRITE_OPTIONS)
    return sink.getvalue().to_pybytes()


def customers() -> pa.Table:
    rng = Rng(11)
    rows = []
    for i in range(1, 41):
        country = rng.pick(COUNTRIES)
        rows.append({
            "customer_id": f"C{i:04d}",
            "name": f"{FIRST[(i * 7) % len(FIRST)]} {LAST[(i * 3) % len(LAST)]}",
            "country": country,
            "currency": CURRENCY_OF[country],
            "segment": rng.pick(SEGMENTS),
            "signup_date": dt.date(2023, 1, 1) + dt.timedelta(days=rng.below(540)),
        })
    schema = pa.schema([
        ("customer_id", pa.string()),
        ("name", pa.string()),
        ("country", pa.string()),
        ("currency", pa.string()),
        ("segment", pa.string()),
        ("signup_date", pa.date32()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def orders(n_rows: int) -> pa.Table:
    """Orders 1..n_rows; the first rows are the same whatever n_rows is, so v2 (more
    rows) is v1 plus the orders placed since."""
    cust = customers().to_pylist()
    rng = Rng(23)
    rows = []
    day = dt.date(2024, 7, 1)
    for i in range(1, n_rows + 1):
        c = rng.pick(cust)
        day += dt.timedelta(days=rng.below(2))
        rows.append({
            "order_id": 100000 + i,
            "customer_id": c["customer_id"],
            "order_date": day,
            "amount": rng.cents(20, 4800),
            "currency": c["currency"],
            "status": rng.pick(STATUSES),
        })
    schema = pa.schema([
        ("order_id", pa.int64()),
        ("customer_id", pa.string()),
        ("order_date", pa.date32()),
        ("amount", MONEY),
        ("currency", pa.string()),
        ("status", pa.string()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def campaigns() -> pa.Table:
    rng = Rng(37)
    rows = []
    for i in range(1, 16):
        start = dt.date(2024, 1, 8) + dt.timedelta(weeks=3 * i)
        rows.append({
            "campaign_id": f"CMP{i:03d}",
            "name": f"{rng.pick(['Spring', 'Summer', 'Autumn', 'Winter'])} "
                    f"{rng.pick(['launch', 'renewal', 'upsell', 'win-back'])} {i}",
            "channel": rng.pick(CHANNELS),
            "start_date": start,
            "end_date": start + dt.timedelta(days=14 + rng.below(30)),
            "budget_eur": rng.cents(2000, 60000),
            "target_segment": rng.pick(SEGMENTS),
        })
    schema = pa.schema([
        ("campaign_id", pa.string()),
        ("name", pa.string()),
        ("channel", pa.string()),
        ("start_date", pa.date32()),
        ("end_date", pa.date32()),
        ("budget_eur", MONEY),
        ("target_segment", pa.string()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


def fx_rates() -> pa.Table:
    """Daily EUR-based reference rates for business days of July 2024 (made up)."""
    rng = Rng(53)
    base = {"USD": 1.0820, "GBP": 0.8450, "CHF": 0.9710}
    rows = []
    day = dt.date(2024, 7, 1)
    while day.month == 7:
        if day.weekday() < 5:
            for quote, mid in base.items():
                drift = (rng.below(4001) - 2000) / 1_000_000
                base[quote] = round(mid + drift, 4)
                rows.append({"date": day, "base": "EUR", "quote": quote,
                             "rate": base[quote]})
        day += dt.timedelta(days=1)
    schema = pa.schema([
        ("date", pa.date32()),
        ("base", pa.string()),
        ("quote", pa.string()),
        ("rate", pa.float64()),
    ])
    return pa.Table.from_pylist(rows, schema=schema)


FINANCE_BUNDLE = """\
# Memory: finance

Notes the assistant keeps about how this company's finance data works. They travel
with the `sales` and `marketing` tables of this demo stack.

## Revenue recognition

Revenue is recognised when an order reaches `paid` or `shipped`; `refunded` orders are
reversed in the month of the refund, not the month of the order, and `cancelled`
orders never counted. When someone asks for "revenue", sum `orders.amount` over
`status IN ('paid', 'shipped')` unless they say gross bookings, which include every
status except `cancelled`.

## Currencies

Every order is in the customer's billing currency (`customers.currency`). Reporting
is in EUR: convert with `fx_rates` on the order date, where `rate` is the number of
units of `quote` per one EUR, so `amount_eur = amount / rate`. There are no rates on
weekends; use the last business day before. EUR orders need no conversion.

## Customers and segments

`segment` is set by the account team at signup and reviewed each January. The finance
team treats `enterprise` and `mid-market` together as "named accounts" in the board
pack; `smb` is reported on its own. Swiss customers (`CH`) are invoiced from the
Zurich entity and close their books one business day later than the rest.

## Month-end close

The books for a month close on the fifth business day of the next month. Numbers for
an open month are provisional: say so when quoting them. Marketing budgets
(`campaigns.budget_eur`) are commitments, not spend; actual spend lives in the
ledger, which this stack only queries remotely (`gl_entries`).
"""


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def table_entry(table_id: str, name: str, url: str, data: bytes) -> dict:
    return {
        "id": table_id,
        "name": name,
        "md5": md5_hex(data),
        "query_mode": "local",
        "parquet_url": url,
        "size": len(data),
    }


def build() -> dict[str, bytes]:
    """Every file this script owns, as relative path -> bytes."""
    files: dict[str, bytes] = {}

    def put_table(table_id: str, name: str, table: pa.Table, sub: str = "") -> dict:
        url = f"/api/data/{table_id}/{sub}download"
        data = parquet_bytes(table)
        files[url.lstrip("/")] = data
        return table_entry(table_id, name, url, data)

    orders_v1 = put_table("tbl_orders", "orders", orders(180))
    orders_v2 = put_table("tbl_orders", "orders", orders(240), sub="v2/")
    customers_t = put_table("tbl_customers", "customers", customers())
    campaigns_t = put_table("tbl_campaigns", "campaigns", campaigns())
    fx_t = put_table("tbl_fx_rates", "fx_rates", fx_rates())

    bundle = FINANCE_BUNDLE.encode("utf-8")
    bundle_url = "/api/memory/finance/bundle.md"
    files[bundle_url.lstrip("/")] = bundle

    # Queried on the server, never downloaded: the engine counts it as skipped, so
    # no file exists for it. Its md5 is a fixed placeholder (the md5 of its id).
    remote = {
        "id": "tbl_gl_entries",
        "name": "gl_entries",
        "md5": md5_hex(b"tbl_gl_entries"),
        "query_mode": "remote",
        "parquet_url": "/api/data/tbl_gl_entries/download",
    }
    finance = {"slug": "finance", "md5": md5_hex(bundle), "bundle_url": bundle_url}

    def package(slug: str, name: str, tables: list[dict]) -> dict:
        return {"id": f"pkg_{slug}", "slug": slug, "name": name, "tables": tables}

    v1 = {
        "direct_tables": [fx_t, remote],
        "data_packages": [
            package("sales", "Sales", [orders_v1, customers_t]),
            package("marketing", "Marketing", [customers_t, campaigns_t]),
        ],
        "memory_domains": [finance],
    }
    v2 = {
        "direct_tables": [fx_t, remote],
        "data_packages": [package("sales", "Sales", [orders_v2, customers_t])],
        "memory_domains": [finance],
    }
    for name, manifest in (("manifest.json", v1), ("manifest-v2.json", v2)):
        files[name] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    return files


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="compare the files on disk with what would be written; write nothing")
    args = ap.parse_args()

    files = build()
    if args.check:
        stale = [p for p, data in files.items()
                 if not (ROOT / p).is_file() or (ROOT / p).read_bytes() != data]
        for p in stale:
            print(f"differs: {p}", file=sys.stderr)
        return 1 if stale else 0

    for rel, data in files.items():
        path = ROOT / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(f"{md5_hex(data)}  {len(data):6d}  {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
