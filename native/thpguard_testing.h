/* SPDX-License-Identifier: MIT
 *
 * thpguard_testing.h - the fault-injection hook of thpguard's native core.
 *
 * For tests and failure drills only; not installed with the library and not
 * part of the C contract in thpguard.h. Nothing is injected unless these are
 * called.
 */
#ifndef THPGUARD_TESTING_H
#define THPGUARD_TESTING_H

#include "thpguard.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Operations that the fault-injection hook can make fail. */
enum tg_fault_op {
    TG_FAULT_COLLAPSE = 0,  /* tg_collapse: one MADV_COLLAPSE attempt */
    TG_FAULT_MAP = 1,       /* tg_map_aligned, tg_copy_remap's new mapping */
    TG_FAULT_SCAN = 2,      /* tg_pagemap_scan */
    TG_FAULT_MREMAP = 3,    /* tg_copy_remap's final mremap */
    TG_FAULT_NOPS = 4
};

/* Make the next `count` calls of `op` fail with `err`. count 0 clears. */
int tg_fault_inject(int op, int err, int count);

void tg_fault_clear(void);

/* Nonzero: injected faults do not apply to this thread's calls (a probe
 * of the library's own must not consume the faults a test set up). */
void tg_fault_suspend(int suspend);

/* Consume one injected fault of `op` for a call made outside this library
 * (a binding that maps memory itself): the errno to fail with, or 0. */
int tg_fault_take(int op);

#ifdef __cplusplus
}
#endif

#endif /* THPGUARD_TESTING_H */
