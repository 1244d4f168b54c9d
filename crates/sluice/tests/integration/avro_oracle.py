"""The avro format's independent check: fastavro (not the Rust SDK Sluice uses) writes and reads
Avro with the schemas Flink derives from the tests' tables, written out here by hand.

  gen N SEED OUT.bin ROWS.jsonl   N orders as length-prefixed binary records, and the same
                                  rows as JSON lines (normalized, see `plain`)
  decode SCHEMA IN.bin OUT.jsonl  length-prefixed records (a zero-length one is a tombstone,
                                  written as null) as normalized JSON lines
  ocf-write N SEED CODEC OUT.avro ROWS.jsonl   the orders as an object container file
  ocf-read IN.avro OUT.jsonl      a container file's records (with the writer's schema)
"""

import datetime
import decimal
import io
import json
import random
import struct
import sys

import fastavro


def nullable(t):
    return ["null", t]


# Flink's AvroSchemaConverter for
#   order_id BIGINT NOT NULL, user_id INT, category STRING, amount DECIMAL(10, 2),
#   paid BOOLEAN, score DOUBLE, qty SMALLINT, day DATE, ts TIMESTAMP(3), tag BYTES
ORDERS = {
    "type": "record",
    "name": "record",
    "namespace": "org.apache.flink.avro.generated",
    "fields": [
        {"name": "order_id", "type": "long"},
        {"name": "user_id", "type": nullable("int"), "default": None},
        {"name": "category", "type": nullable("string"), "default": None},
        {
            "name": "amount",
            "type": nullable({"type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 2}),
            "default": None,
        },
        {"name": "paid", "type": nullable("boolean"), "default": None},
        {"name": "score", "type": nullable("double"), "default": None},
        {"name": "qty", "type": nullable("int"), "default": None},
        {"name": "day", "type": nullable({"type": "int", "logicalType": "date"}), "default": None},
        {"name": "ts", "type": nullable({"type": "long", "logicalType": "timestamp-millis"}), "default": None},
        {"name": "tag", "type": nullable("bytes"), "default": None},
    ],
}

# The upsert-kafka table `totals (category STRING, n BIGINT, total DECIMAL(12, 2),
# PRIMARY KEY (category) NOT ENFORCED)`: the key is the primary key (NOT NULL).
TOTALS_KEY = {
    "type": "record",
    "name": "record",
    "namespace": "org.apache.flink.avro.generated",
    "fields": [{"name": "category", "type": "string"}],
}
TOTALS_VALUE = {
    "type": "record",
    "name": "record",
    "namespace": "org.apache.flink.avro.generated",
    "fields": [
        {"name": "category", "type": "string"},
        {"name": "n", "type": nullable("long"), "default": None},
        {
            "name": "total",
            "type": nullable({"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2}),
            "default": None,
        },
    ],
}

# The key of the orders' copy (`key.fields` = `order_id`, NOT NULL).
ORDERS_KEY = {
    "type": "record",
    "name": "record",
    "namespace": "org.apache.flink.avro.generated",
    "fields": [{"name": "order_id", "type": "long"}],
}

SCHEMAS = {"orders": ORDERS, "orders-key": ORDERS_KEY, "totals-key": TOTALS_KEY, "totals-value": TOTALS_VALUE}
CATEGORIES = ["phone", "laptop", "food", "toy", "book", "汉字"]
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def orders(n, seed):
    rng = random.Random(seed)

    def maybe(v):
        return None if rng.random() < 0.1 else v

    for i in range(n):
        yield {
            "order_id": seed * 1_000_000 + i * 7 - 50,
            "user_id": maybe(rng.randint(-(2**31), 2**31 - 1)),
            "category": maybe(rng.choice(CATEGORIES)),
            "amount": maybe(decimal.Decimal(rng.randint(-99999999, 99999999)).scaleb(-2)),
            "paid": maybe(rng.random() < 0.5),
            "score": maybe(rng.uniform(-1e6, 1e6)),
            "qty": maybe(rng.randint(-32768, 32767)),
            "day": maybe(datetime.date(2026, 11, 11) + datetime.timedelta(days=rng.randint(-20000, 20000))),
            "ts": maybe(EPOCH + datetime.timedelta(milliseconds=rng.randint(-10**12, 4 * 10**12))),
            "tag": maybe(bytes(rng.randrange(256) for _ in range(rng.randint(0, 6)))),
        }


def plain(v):
    """A value as the tests compare it: timestamps as Flink's text, decimals and dates as text,
    bytes as hex."""
    if isinstance(v, datetime.datetime):
        if v.tzinfo is not None:
            v = v.astimezone(datetime.timezone.utc).replace(tzinfo=None)
        return v.strftime("%Y-%m-%d %H:%M:%S.") + "%03d" % (v.microsecond // 1000)
    if isinstance(v, datetime.date):
        return v.isoformat()
    if isinstance(v, decimal.Decimal):
        return str(v)
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, dict):
        return {k: plain(x) for k, x in v.items()}
    return v


def write_lines(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(plain(r), ensure_ascii=False) + "\n")


def main():
    cmd = sys.argv[1]
    if cmd == "gen":
        n, seed, out, rows_path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
        parsed = fastavro.parse_schema(ORDERS)
        rows = list(orders(n, seed))
        with open(out, "wb") as f:
            for r in rows:
                buf = io.BytesIO()
                fastavro.schemaless_writer(buf, parsed, r)
                body = buf.getvalue()
                f.write(struct.pack(">I", len(body)) + body)
        write_lines(rows_path, rows)
    elif cmd == "decode":
        parsed = fastavro.parse_schema(SCHEMAS[sys.argv[2]])
        data = open(sys.argv[3], "rb").read()
        rows, at = [], 0
        while at < len(data):
            (size,) = struct.unpack(">I", data[at : at + 4])
            body = data[at + 4 : at + 4 + size]
            at += 4 + size
            if size == 0:
                rows.append(None)
                continue
            buf = io.BytesIO(body)
            rows.append(fastavro.schemaless_reader(buf, parsed, None))
            if buf.read():
                sys.exit("bytes left after a record: it does not match the schema")
        write_lines(sys.argv[4], rows)
    elif cmd == "ocf-write":
        n, seed, codec, out, rows_path = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6]
        rows = list(orders(n, seed))
        with open(out, "wb") as f:
            fastavro.writer(f, fastavro.parse_schema(ORDERS), rows, codec=codec, sync_interval=4000)
        write_lines(rows_path, rows)
    elif cmd == "ocf-read":
        with open(sys.argv[2], "rb") as f:
            rows = list(fastavro.reader(f))
        write_lines(sys.argv[3], rows)
    else:
        sys.exit("unknown command " + cmd)


if __name__ == "__main__":
    main()
