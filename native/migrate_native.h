/* Umbrella header for the migrate._native extension (see build_native.py). */
#ifndef MIGRATE_NATIVE_H
#define MIGRATE_NATIVE_H
#include "uffd.h"
#include "bitmap.h"
#include "pages.h"
#include "workload.h"
#include "dirty.h"
#include "snapshot.h"
#include "alloc.h"
#include "dp_wire.h"
#include "dp_common.h"
#include "dp_source.h"
#include "dp_dest.h"
#include "kvm.h"
#endif
