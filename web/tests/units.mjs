// Byte units for the web tests' fixtures (one place for every test file).
export const MiB = 1024 ** 2;
export const GiB = 1024 ** 3;
