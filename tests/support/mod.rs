pub mod pyrandom;
