/* A 32-bit word native code changes beside Python: atomic reads, sets and clears (words.py). */
#include <stdint.h>

/* cdef: */
uint32_t smol_word_get(uint32_t *word);
void smol_word_put(uint32_t *word, uint32_t value);
void smol_word_set(uint32_t *word, uint32_t bits);
void smol_word_clear(uint32_t *word, uint32_t bits);
/* cdef end */

uint32_t smol_word_get(uint32_t *word) { return __atomic_load_n(word, __ATOMIC_SEQ_CST); }
void smol_word_put(uint32_t *word, uint32_t value) { __atomic_store_n(word, value, __ATOMIC_SEQ_CST); }
void smol_word_set(uint32_t *word, uint32_t bits) { __atomic_fetch_or(word, bits, __ATOMIC_SEQ_CST); }
void smol_word_clear(uint32_t *word, uint32_t bits) { __atomic_fetch_and(word, ~bits, __ATOMIC_SEQ_CST); }
