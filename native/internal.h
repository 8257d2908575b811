/* SPDX-License-Identifier: MIT
 *
 * internal.h - between the native core's own files; not installed.
 */
#ifndef THPGUARD_INTERNAL_H
#define THPGUARD_INTERNAL_H

/* uffd.c's parts of the one set of pthread_atfork handlers (thpguard.c). */
void tg__copy_prepare(void);
void tg__copy_parent(void);
void tg__copy_child(void);
void tg__copy_unprotect_split(uintptr_t addr, size_t len);

#endif
