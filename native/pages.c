/* Source-side page packing (see pages.h). */
#include <errno.h>
#include <string.h>

#include "pages.h"
#include "dp_common.h"

int mig_page_is_zero(const uint8_t *p, uint32_t page_size)
{
    const uint64_t *w = (const uint64_t *)p;
    for (uint32_t i = 0; i < page_size / 8; i += 8) {
        uint64_t acc = 0;
        for (int j = 0; j < 8; j++)
            acc |= w[i + j];
        if (acc)
            return 0;
    }
    return 1;
}

int64_t mig_pack_pages(const uint8_t *src, uint32_t npages, uint32_t page_size, uint32_t *zero_runs,
                       uint32_t max_runs, uint32_t *nzero_runs, uint8_t *dst, uint64_t *digest)
{
    uint32_t runs = 0;
    uint64_t out = 0;
    for (uint32_t i = 0; i < npages; i++) {
        const uint8_t *page = src + (uint64_t)i * page_size;
        if (!mig_page_is_zero(page, page_size)) {
            memcpy(dst + out, page, page_size);
            out += page_size;
        } else if (runs && zero_runs[2 * runs - 2] + zero_runs[2 * runs - 1] == i) {
            zero_runs[2 * runs - 1]++;
        } else {
            if (runs == max_runs)
                return -ENOSPC;
            zero_runs[2 * runs] = i;
            zero_runs[2 * runs + 1] = 1;
            runs++;
        }
    }
    *nzero_runs = runs;
    *digest = mig_digest(dst, out);
    return (int64_t)out;
}

/* ---- PageBatch serializing (the source) and parsing (the destination) ---- */

static uint8_t *put_varint(uint8_t *p, uint64_t v)
{
    while (v > 0x7F) {
        *p++ = (uint8_t)(v & 0x7F) | 0x80;
        v >>= 7;
    }
    *p++ = (uint8_t)v;
    return p;
}

static uint32_t varint_len(uint64_t v)
{
    uint32_t n = 1;
    while (v > 0x7F) {
        v >>= 7;
        n++;
    }
    return n;
}

int64_t mig_encode_batch(const uint8_t *src, uint32_t npages, uint32_t page_size, uint64_t req_id,
                         uint64_t first_page, uint32_t *runs, uint32_t max_runs, uint8_t *out, uint64_t out_len,
                         uint64_t *end)
{
    uint64_t need = MIG_BATCH_ROOM(npages, page_size);
    if (out_len < need)
        return -ENOSPC;
    /* The pages go to their final place first, after room for the header,
     * which is then written right-aligned in front of them. */
    uint64_t room = need - (uint64_t)npages * page_size;
    uint32_t nruns;
    uint64_t digest;
    int64_t n = mig_pack_pages(src, npages, page_size, runs, max_runs, &nruns, out + room, &digest);
    if (n < 0)
        return n;
    uint8_t hdr[MIG_BATCH_ROOM_FIXED], *h = hdr; /* 5 keys and varints: at most 55 */
    uint64_t runs_len = 0;
    for (uint32_t i = 0; i < 2 * nruns; i++)
        runs_len += varint_len(runs[i]);
    *h++ = 1 << 3; h = put_varint(h, req_id);
    *h++ = 2 << 3; h = put_varint(h, first_page);
    *h++ = 3 << 3; h = put_varint(h, npages);
    *h++ = 7 << 3; h = put_varint(h, (uint64_t)n);
    *h++ = 8 << 3; h = put_varint(h, digest);
    uint64_t hdr_len = (uint64_t)(h - hdr);
    uint64_t runs_field = nruns ? 1 + varint_len(runs_len) + runs_len : 0;
    uint64_t data_field = n ? 1 + varint_len((uint64_t)n) : 0;
    uint64_t start = room - data_field - runs_field - hdr_len;
    uint8_t *p = out + start;
    memcpy(p, hdr, hdr_len);
    p += hdr_len;
    if (nruns) {
        *p++ = 4 << 3 | 2;
        p = put_varint(p, runs_len);
        for (uint32_t i = 0; i < 2 * nruns; i++)
            p = put_varint(p, runs[i]);
    }
    if (n) {
        *p++ = 6 << 3 | 2;
        p = put_varint(p, (uint64_t)n);
    }
    *end = room + (uint64_t)n;
    return (int64_t)start;
}

/* ---- PageBatch parsing ---- */

enum { WT_VARINT = 0, WT_I64 = 1, WT_LEN = 2, WT_I32 = 5 };

/* A base-128 varint at *p (at most 10 bytes, within end); advances *p. */
static int read_varint(const uint8_t **p, const uint8_t *end, uint64_t *out)
{
    uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (*p >= end)
            return -EINVAL;
        uint8_t b = *(*p)++;
        v |= (uint64_t)(b & 0x7F) << shift;
        if (!(b & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return -EINVAL;
}

static int append_run(struct mig_batch *out, uint32_t *runs, uint32_t max_runs, uint64_t v)
{
    if (out->nzero_runs == max_runs)
        return -ENOSPC;
    runs[out->nzero_runs++] = (uint32_t)v;
    return 0;
}

int mig_parse_batch(const uint8_t *buf, uint64_t len, struct mig_batch *out, uint32_t *runs, uint32_t max_runs)
{
    const uint8_t *p = buf, *end = buf + len;
    memset(out, 0, sizeof(*out));
    while (p < end) {
        uint64_t key, v, n;
        if (read_varint(&p, end, &key) < 0)
            return -EINVAL;
        uint64_t field = key >> 3;
        int wt = (int)(key & 7);
        if (field == 0)
            return -EINVAL;
        if (wt == WT_VARINT) {
            if (read_varint(&p, end, &v) < 0)
                return -EINVAL;
            switch (field) {
            case 1: out->req_id = v; break;
            case 2: out->first_page = v; break;
            case 3: out->count = (uint32_t)v; break;
            case 4: if (append_run(out, runs, max_runs, v) < 0) return -ENOSPC; break;
            case 5: out->encoding = (int32_t)v; break;
            case 7: out->raw_len = (uint32_t)v; break;
            case 8: out->checksum = v; break;
            default: break; /* unknown, or a known field with another wire type: skipped */
            }
        } else if (wt == WT_LEN) {
            if (read_varint(&p, end, &n) < 0 || n > (uint64_t)(end - p))
                return -EINVAL;
            const uint8_t *field_end = p + n;
            if (field == 6) {
                out->data_off = (uint64_t)(p - buf);
                out->data_len = n;
            } else if (field == 4) { /* packed zero_runs */
                while (p < field_end) {
                    if (read_varint(&p, field_end, &v) < 0)
                        return -EINVAL;
                    if (append_run(out, runs, max_runs, v) < 0)
                        return -ENOSPC;
                }
            }
            p = field_end;
        } else if (wt == WT_I64 || wt == WT_I32) {
            uint64_t size = wt == WT_I64 ? 8 : 4;
            if (size > (uint64_t)(end - p))
                return -EINVAL;
            p += size;
        } else {
            return -EINVAL; /* groups (3, 4) and wire types 6, 7 have no place here */
        }
    }
    out->data_digest = mig_digest(buf + out->data_off, out->data_len);
    return 0;
}

int64_t mig_zero_pages(uint32_t count, const uint32_t *runs, uint32_t npairs, uint32_t *bad)
{
    uint64_t zero_pages = 0, prev_end = 0;
    for (uint32_t i = 0; i < npairs; i++) {
        uint64_t s = runs[2 * i], l = runs[2 * i + 1];
        if (s < prev_end || l == 0 || s + l > count) {
            *bad = i;
            return -1;
        }
        zero_pages += l;
        prev_end = s + l;
    }
    return (int64_t)zero_pages;
}

int mig_check_batch(const struct mig_batch *b, const uint32_t *runs, uint64_t npages, uint32_t page_size,
                    uint64_t *data_bytes, uint32_t *bad_run)
{
    if (b->count == 0 || b->first_page >= npages || b->count > npages - b->first_page)
        return MIG_BATCH_RANGE;
    if (b->nzero_runs % 2)
        return MIG_BATCH_RUN_PAIRS;
    int64_t zero_pages = mig_zero_pages(b->count, runs, b->nzero_runs / 2, bad_run);
    if (zero_pages < 0)
        return MIG_BATCH_RUN;
    *data_bytes = (b->count - (uint64_t)zero_pages) * page_size;
    return b->raw_len == *data_bytes ? MIG_BATCH_OK : MIG_BATCH_SIZE;
}

int64_t mig_encode_runs(const uint8_t *mem, uint64_t mem_pages, const uint64_t *runs, uint32_t nruns,
                        uint32_t page_size, uint64_t req_id, uint8_t field_key, uint32_t *zruns, uint32_t max_zruns,
                        uint8_t *out, uint64_t out_len)
{
    uint64_t pos = 0;
    for (uint32_t i = 0; i < nruns; i++) {
        uint64_t first = runs[2 * i], count = runs[2 * i + 1], end;
        if (count == 0 || count > UINT32_MAX || first > mem_pages || count > mem_pages - first)
            return -EINVAL;
        if (out_len - pos < MIG_FIELD_ROOM)
            return -ENOSPC;
        /* Encoded after room for the field's key and length, then moved down against them. */
        uint8_t *room = out + pos + MIG_FIELD_ROOM;
        int64_t start = mig_encode_batch(mem + first * page_size, (uint32_t)count, page_size, req_id, first, zruns,
                                         max_zruns, room, out_len - pos - MIG_FIELD_ROOM, &end);
        if (start < 0)
            return start;
        uint64_t blen = end - (uint64_t)start;
        uint8_t *p = out + pos;
        *p++ = field_key;
        p = put_varint(p, blen);
        memmove(p, room + start, blen);
        pos = (uint64_t)(p - out) + blen;
    }
    return (int64_t)pos;
}

int64_t mig_next_field(const uint8_t *buf, uint64_t len, uint64_t pos, uint8_t key, uint64_t *field_len)
{
    if (pos >= len || buf[pos] != key)
        return -EINVAL;
    pos++;
    uint64_t v = 0;
    for (unsigned shift = 0;; shift += 7) {
        if (pos >= len || shift > 63)
            return -EINVAL;
        uint8_t byte = buf[pos++];
        v |= (uint64_t)(byte & 0x7f) << shift;
        if (byte < 0x80)
            break;
    }
    if (v > len - pos)
        return -EINVAL;
    *field_len = v;
    return (int64_t)pos;
}
