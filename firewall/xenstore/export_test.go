package xenstore

// MaxTxRetries is the retry bound, for the external tests.
const MaxTxRetries = maxTxRetries
