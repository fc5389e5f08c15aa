/* Source-side page packing: split a batch of pages into zero runs and the
 * concatenated non-zero pages (see pages.c). */
#ifndef MIGRATE_PAGES_H
#define MIGRATE_PAGES_H

#include <stdint.h>

/* Is the page (page_size a multiple of 64) all zero? ORs 64-byte blocks word
 * by word (the compiler vectorizes the inner loop) and stops at the first
 * block with a set bit: non-zero pages usually differ from zero early. */
int mig_page_is_zero(const uint8_t *p, uint32_t page_size);

/* cffi: begin */
/* Scan npages pages at src. Zero pages become runs (start, len) in zero_runs,
 * pairs relative to src, at most max_runs pairs; *nzero_runs gets their
 * number. The other pages are copied, in order, contiguously into dst (room
 * for npages pages), and *digest gets mig_digest of what was copied: one
 * call (one GIL release) per batch, which matters on the urgent path.
 * Returns bytes written to dst, or -ENOSPC when the runs do not fit. */
int64_t mig_pack_pages(const uint8_t *src, uint32_t npages, uint32_t page_size, uint32_t *zero_runs,
                       uint32_t max_runs, uint32_t *nzero_runs, uint8_t *dst, uint64_t *digest);
/* cffi: end */

/* Room mig_encode_batch needs at out for npages pages: the pages plus the
 * most the other fields can take, MIG_BATCH_ROOM_PER_PAGE bytes a page
 * (its zero_runs varints) and MIG_BATCH_ROOM_FIXED bytes (the scalar
 * fields and keys). Python sizes its buffers from the same two constants. */
/* cffi: begin */
#define MIG_BATCH_ROOM_PER_PAGE 10
#define MIG_BATCH_ROOM_FIXED 84
/* cffi: end */
#define MIG_BATCH_ROOM(npages, page_size) \
    ((uint64_t)(npages) * ((page_size) + MIG_BATCH_ROOM_PER_PAGE) + MIG_BATCH_ROOM_FIXED)

/* cffi: begin */
/* Serialize pages [0, npages) at src as a raw PageBatch (proto/migrate.proto)
 * into out (out_len bytes, at least MIG_BATCH_ROOM): zero pages as runs, the
 * other pages as data, with their checksum; req_id and first_page as given.
 * The source's whole encode in one call, the pages copied once. Returns the
 * offset in out where the message starts (it ends at *end), or -ENOSPC (out
 * too small, or more than max_runs zero runs: runs is scratch room). */
int64_t mig_encode_batch(const uint8_t *src, uint32_t npages, uint32_t page_size, uint64_t req_id,
                         uint64_t first_page, uint32_t *runs, uint32_t max_runs, uint8_t *out, uint64_t out_len,
                         uint64_t *end);

/* Room in front of a field's contents for its key and length (a varint). */
#define MIG_FIELD_ROOM 11

/* Serialize the runs (first, count pairs: nruns of them, each inside mem's
 * mem_pages pages) as consecutive raw PageBatch messages, each as a
 * length-delimited field `field_key` of an enclosing message (a bulk
 * stream's PageBatches): one call for a message of many short batches.
 * out needs the sum of MIG_BATCH_ROOM + MIG_FIELD_ROOM over the runs.
 * Returns the bytes written at out, -EINVAL for an empty run or one outside
 * mem, or -ENOSPC. */
int64_t mig_encode_runs(const uint8_t *mem, uint64_t mem_pages, const uint64_t *runs, uint32_t nruns,
                        uint32_t page_size, uint64_t req_id, uint8_t field_key, uint32_t *zruns, uint32_t max_zruns,
                        uint8_t *out, uint64_t out_len);

/* The length-delimited field `key` at offset pos of (buf, len): returns the
 * offset of its contents (*field_len bytes, inside the buffer), or -EINVAL
 * for another key, a bad length or one past the end. */
int64_t mig_next_field(const uint8_t *buf, uint64_t len, uint64_t pos, uint8_t key, uint64_t *field_len);

/* The fields of a serialized PageBatch (proto/migrate.proto). data_off and
 * data_len locate the data field inside the buffer parsed: the pages are
 * never copied out of it. data_digest is mig_digest of the data field as it
 * travelled (the checksum itself when the batch is raw). */
struct mig_batch {
    uint64_t req_id, first_page, checksum, data_off, data_len, data_digest;
    uint32_t count, raw_len, nzero_runs;
    int32_t encoding;
};

/* Parse a serialized PageBatch of len bytes at buf, as any protobuf parser
 * would: fields in any order, the last of a scalar wins, zero_runs packed or
 * not, unknown fields skipped. zero_runs values go to runs (room for
 * max_runs). Returns 0, -EINVAL for bytes that are not a PageBatch, or
 * -ENOSPC for more than max_runs zero_runs values. */
int mig_parse_batch(const uint8_t *buf, uint64_t len, struct mig_batch *out, uint32_t *runs, uint32_t max_runs);
/* cffi: end */

/* Pages covered by npairs zero runs (start, length) in a batch of count
 * pages, or -1 when a run is empty, out of order, overlapping or beyond
 * count (*bad gets its index). */
int64_t mig_zero_pages(uint32_t count, const uint32_t *runs, uint32_t npairs, uint32_t *bad);

/* cffi: begin */
/* Why a parsed batch may not be installed (MIG_BATCH_OK when it may): its
 * pages outside the guest's npages, zero_runs values not in pairs, a bad
 * zero run (*bad_run gets its index), or raw_len not one page per non-zero
 * page (*data_bytes gets what the shape needs, once the runs are sound).
 * The one statement of a batch's shape: the installer applies it, Python
 * names the broken rule. Data length and checksum depend on the encoding;
 * the caller checks them. */
enum mig_batch_fault { MIG_BATCH_OK, MIG_BATCH_RANGE, MIG_BATCH_RUN_PAIRS, MIG_BATCH_RUN, MIG_BATCH_SIZE };
int mig_check_batch(const struct mig_batch *b, const uint32_t *runs, uint64_t npages, uint32_t page_size,
                    uint64_t *data_bytes, uint32_t *bad_run);
/* cffi: end */

#endif
